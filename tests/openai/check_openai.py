"""Drives a Tandem router with the official `openai` Python package (pip install openai).

Usage: python3 check_openai.py BASE_URL MODEL_ID PROMPT RAW_PROMPT MAX_TOKENS

Runs chat and completion requests, streaming and not, checks what only the client can see (typed responses,
streaming chunk shapes, usage, logprobs, the 400 error type), and prints one JSON object with the texts it got so
the calling test can compare them with the engine's own greedy output.
"""

import json
import sys

import openai


def main() -> None:
    base_url, model, prompt, raw_prompt, max_tokens = sys.argv[1:6]
    max_tokens = int(max_tokens)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    models = [m.id for m in client.models.list().data]
    assert models == [model], models

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert chat.usage.completion_tokens <= max_tokens and chat.usage.prompt_tokens > 0, chat.usage
    assert len(choice.logprobs.content) == chat.usage.completion_tokens, choice.logprobs
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_streamed, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            chat_streamed += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == choice.finish_reason, (finish, choice.finish_reason)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    completion = client.completions.create(model=model, prompt=raw_prompt, max_tokens=max_tokens, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    completion_streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=raw_prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        if c.choices
    )

    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=-3)
        raise AssertionError("a negative max_tokens was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "max_tokens" in str(e), e

    print(
        json.dumps(
            {
                "chat": choice.message.content,
                "chat_streamed": chat_streamed,
                "completion": completion.choices[0].text,
                "completion_streamed": completion_streamed,
            }
        )
    )


if __name__ == "__main__":
    main()
