#!/usr/bin/env python3
"""Independent NumPy reference for the llama forward pass of SmolLM2-135M-Instruct (GGUF, Q4_1).

What it is
----------
A deliberately small, readable re-implementation of the llama architecture used to produce
golden fixtures for the Rust engine. It shares no code with the engine:

* weights: read with ``gguf.GGUFReader`` and dequantized to float with ``gguf.quants.dequantize``
  (Q4_1 matrices, Q8_0 token embedding which is also the tied output head, F32 norms);
* compute: float64 NumPy, full causal attention with a KV cache (prefill once, then one token
  per greedy step);
* RoPE: llama.cpp's GGUF converter permutes the HF Q/K weights back to the original Meta layout,
  so RoPE here rotates ADJACENT pairs (dims 2i, 2i+1) with frequency theta^(-2i/head_dim)
  (ggml "NORM" rope), not the HF/NeoX half-split form;
* tokenizer: built independently of the engine, in this order of preference
    1. ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)``. With transformers 5.x
       this needs torch (its GGUF metadata reader imports torch), which we do not install, so it
       normally fails and we go to 2.
    2. transformers' own GGUF->tokenizer converter (``convert_gguf_tokenizer``, the function
       AutoTokenizer calls) fed with vocab/merges/token types read by ``gguf.GGUFReader``.
       Note: transformers has no split regex for ``tokenizer.ggml.pre == "smollm"``; it would leave
       the GPT-2 ByteLevel regex only. llama.cpp's "smollm" pre-tokenizer (and SmolLM2's original
       tokenizer.json) first isolates every digit (``\\p{N}``), so we set the pre-tokenizer to
       Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
    3. fallback: a ``tokenizers`` BPE Tokenizer built directly from the GGUF tokens/merges with
       that same pre-tokenizer and a ByteLevel decoder; control tokens (token_type 3, e.g.
       <|im_start|>, <|im_end|>, <|endoftext|>) added as special tokens.
  Tokenizer 3 is always built too and must agree with the chosen one on every fixture string.
  ``meta.tokenizer_source`` records which one produced the fixtures. No BOS is added
  (tokenizer.ggml.add_bos_token = false).
* chat prompts: ``tokenizer.chat_template`` from the GGUF rendered with jinja2,
  add_generation_prompt=True.

How to run
----------
    python3 tests/reference/reference.py --model /root/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out tests/reference/fixtures
Needs: numpy, gguf, tokenizers, jinja2 (transformers optional, no torch). ~2-2.5 minutes on 2 cores
(float64 compute is memory-bound: ~0.5 s per greedy step).

Fixtures written to --out
-------------------------
fixtures.json: {"meta": {...}, "prompts": [ {...}, ... ]}
  meta.model_file / model_sha256   GGUF file name and its sha256
  meta.numpy_version, gguf_version, tokenizers_version, transformers_version
  meta.tokenizer_source            which tokenizer route above produced the ids
  meta.compute                     dtype / algorithm notes
  per prompt:
    name          short identifier
    prompt        exact text fed to the tokenizer (chat prompts are already templated)
    chat          true if the prompt came from the chat template (add_generation_prompt=True)
    messages      (chat only) the messages rendered into the template
    token_ids     tokenizer output, special tokens parsed, no BOS
    top1          argmax next-token id after each prompt position (len == len(token_ids)),
                  i.e. top1[i] is the prediction given token_ids[0..=i]
    top2_margin   logit(top1) - logit(second best) at each position; small values (< ~0.05)
                  mark near-ties where a quantized/float32 engine may legitimately differ
    logits        per position, the reference's top-8 as [[token_id, logit], ...] best first,
                  logits rounded to 4 decimals (raw logits, no softmax/temperature)
    greedy        32 token ids of greedy continuation (argmax, fed back, no EOS stop);
                  greedy[0] == top1[-1]
    greedy_text   greedy decoded with special tokens kept
    greedy_top2_margin  the top1-top2 logit gap at each greedy step (same meaning as above).
                  A consumer comparing greedy output should only require exact agreement up to
                  (and including) the first step whose margin is a near-tie; after a flip the
                  continuations legitimately diverge.
tokenizer.json: {"meta": {...}, "cases": [{"text": str, "token_ids": [int], "decoded": str}]}
  decoded = tokenizer decode of token_ids (special tokens kept); equals text for these cases.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import gguf
from gguf import GGUFReader
from gguf.quants import dequantize

DTYPE = np.float64
TOPK = 8
N_GREEDY = 32


# ----------------------------------------------------------------------------------------------
# GGUF loading
# ----------------------------------------------------------------------------------------------
def field(reader, key):
    f = reader.fields[key]
    return f.contents()


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        self.reader = r
        assert field(r, "general.architecture") == "llama"
        self.n_layer = field(r, "llama.block_count")
        self.d = field(r, "llama.embedding_length")
        self.n_head = field(r, "llama.attention.head_count")
        self.n_kv = field(r, "llama.attention.head_count_kv")
        self.hd = self.d // self.n_head
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.theta = float(field(r, "llama.rope.freq_base"))
        t = {x.name: x for x in r.tensors}

        def W(name):  # dequantized, numpy shape (rows=out_features, cols=in_features)
            x = t[name]
            return dequantize(x.data, x.tensor_type).reshape(tuple(int(s) for s in reversed(x.shape))).astype(DTYPE)

        self.tok_embd = W("token_embd.weight")  # (vocab, d) -- Q8_0
        self.out_norm = W("output_norm.weight")
        self.output = W("output.weight") if "output.weight" in t else self.tok_embd  # tied
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            self.layers.append({k: W(p + k + ".weight") for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")})
        # RoPE tables: pair i = dims (2i, 2i+1), freq theta^(-2i/hd)
        self.inv_freq = self.theta ** (-np.arange(0, self.hd, 2, dtype=DTYPE) / self.hd)

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        # x: (T, H, hd); rotate adjacent pairs (2i, 2i+1)
        ang = pos[:, None].astype(DTYPE) * self.inv_freq[None, :]  # (T, hd/2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def new_cache(self):
        return [{"k": np.zeros((0, self.n_kv, self.hd), DTYPE), "v": np.zeros((0, self.n_kv, self.hd), DTYPE)}
                for _ in range(self.n_layer)]

    def forward(self, ids, cache):
        """Run tokens `ids` after whatever is in `cache`; returns logits (T, vocab)."""
        T = len(ids)
        start = cache[0]["k"].shape[0]
        pos = np.arange(start, start + T)
        rep = self.n_head // self.n_kv
        x = self.tok_embd[np.asarray(ids)]
        for L, c in zip(self.layers, cache):
            h = self.rms(x, L["attn_norm"])
            q = (h @ L["attn_q"].T).reshape(T, self.n_head, self.hd)
            k = (h @ L["attn_k"].T).reshape(T, self.n_kv, self.hd)
            v = (h @ L["attn_v"].T).reshape(T, self.n_kv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            c["k"] = np.concatenate([c["k"], k]); c["v"] = np.concatenate([c["v"], v])
            K = np.repeat(c["k"], rep, axis=1)  # (S, H, hd): q head h uses kv head h // rep
            V = np.repeat(c["v"], rep, axis=1)
            S = K.shape[0]
            att = np.einsum("thd,shd->hts", q, K) / np.sqrt(self.hd)
            mask = np.arange(S)[None, :] > pos[:, None]  # causal
            att = np.where(mask[None], -np.inf, att)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, V).reshape(T, self.d)
            x = x + o @ L["attn_output"].T
            h = self.rms(x, L["ffn_norm"])
            g = h @ L["ffn_gate"].T
            u = h @ L["ffn_up"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ L["ffn_down"].T  # SwiGLU
        return self.rms(x, self.out_norm) @ self.output.T


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def gguf_tokenizer_dict(reader):
    d = {
        "tokenizer_type": field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer_type": field(reader, "tokenizer.ggml.pre"),
        "tokens": field(reader, "tokenizer.ggml.tokens"),
        "merges": field(reader, "tokenizer.ggml.merges"),
        "token_type": field(reader, "tokenizer.ggml.token_type"),
    }
    return d


def smollm_pretokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def manual_tokenizer(td):
    """Route 3: plain `tokenizers` BPE from the GGUF vocab + merges."""
    from tokenizers import Tokenizer, AddedToken, models, decoders
    assert td["tokenizer_type"] == "gpt2" and td["pre_tokenizer_type"] == "smollm"
    vocab = {tok: i for i, tok in enumerate(td["tokens"])}
    merges = [tuple(m.split(" ")) for m in td["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = smollm_pretokenizer()
    tk.decoder = decoders.ByteLevel()
    control = [AddedToken(tok, special=True, normalized=False)
               for tok, tt in zip(td["tokens"], td["token_type"]) if tt == 3]  # 3 = CONTROL
    tk.add_special_tokens(control)
    return tk


def build_tokenizer(model_path, td):
    """Returns (tokenizers.Tokenizer, source description)."""
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model_path)),
                                           gguf_file=os.path.basename(model_path))
        tk = hf.backend_tokenizer
        src = "transformers AutoTokenizer.from_pretrained(gguf_file=...)"
    except Exception as e:  # noqa: BLE001 -- transformers 5.x GGUF reader needs torch
        print(f"[tokenizer] AutoTokenizer(gguf_file=) failed: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
            import transformers
            tk, _ = convert_gguf_tokenizer("llama", dict(td))
            src = (f"transformers {transformers.__version__} convert_gguf_tokenizer() on GGUFReader metadata "
                   "(AutoTokenizer gguf path needs torch)")
        except Exception as e2:  # noqa: BLE001
            print(f"[tokenizer] convert_gguf_tokenizer failed: {e2}", file=sys.stderr)
            return manual_tokenizer(td), "tokenizers BPE built from GGUF tokens/merges (fallback)"
    # transformers knows no split regex for pre='smollm'; apply llama.cpp's (digits isolated first).
    tk.pre_tokenizer = smollm_pretokenizer()
    return tk, src + "; pre_tokenizer set to Sequence[Digits(individual), ByteLevel(use_regex)] as llama.cpp 'smollm'"


def encode(tk, text):
    return tk.encode(text, add_special_tokens=False).ids


def decode(tk, ids):
    return tk.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
RAW_PROMPTS = [
    ("capital_raw", "The capital of France is"),
    ("paragraph_raw",
     "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt "
     "and wind. Every evening, the keeper climbed the spiral stairs to light the lamp, watching the ships "
     "pass safely through the narrow channel below. One stormy night, however,"),
    ("unicode_digits", "In 2024, the café sold 1,234 crêpes — ça va? 🙂"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"),
]
CHAT_PROMPTS = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat_haiku", [{"role": "user", "content": "Write a haiku about the sea."}]),
    ("chat_system_math", [{"role": "system", "content": "You are a concise assistant."},
                          {"role": "user", "content": "What is 12 + 30?"}]),
]
TOKENIZER_CASES = [
    "", " ", "  ", "   leading spaces", "trailing spaces   ", "multiple   spaces  here",
    "Hello world", "hello\nworld", "line1\n\nline3\n", "\n\n\n", "tab\tseparated\tvalues", "\t\tindented",
    "12345", "3.14159", "1,000,000 and 2024-01-15", "x=42;y=-7", "don't I'll we're they've she'd IT'S",
    "café naïve résumé", "Привет, мир!", "日本語のテキスト", "你好，世界", "emoji 🙂👍🏽🚀", "a—b–c…",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "not special: <|im_start", "<|im_end|><|im_start|>",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "https://example.com/path?q=1&r=two", "UPPER lower MiXeD", "   \n  \t ",
]


def render_chat(template, messages):
    import jinja2
    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def topk_pairs(row, k=TOPK):
    idx = np.argsort(-row, kind="stable")[:k]
    return [[int(i), round(float(row[i]), 4)] for i in idx], int(idx[0]), float(row[idx[0]] - row[idx[1]])


def run_prompt(model, tk, name, prompt, chat, messages=None):
    ids = encode(tk, prompt)
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    rec = {"name": name, "prompt": prompt, "chat": chat}
    if messages is not None:
        rec["messages"] = messages
    rec["token_ids"] = ids
    rec["top1"], rec["top2_margin"], rec["logits"] = [], [], []
    for row in logits:
        pairs, top, margin = topk_pairs(row)
        rec["top1"].append(top); rec["top2_margin"].append(round(margin, 4)); rec["logits"].append(pairs)
    greedy, gmargins = [], []
    last = logits[-1]
    for _ in range(N_GREEDY):
        _, nxt, margin = topk_pairs(last, 2)
        greedy.append(nxt); gmargins.append(round(margin, 4))
        last = model.forward([nxt], cache)[-1]
    rec["greedy"], rec["greedy_text"], rec["greedy_top2_margin"] = greedy, decode(tk, greedy), gmargins
    return rec


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/root/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)

    model = Model(args.model)
    print(f"[load] {time.time() - t0:.1f}s", file=sys.stderr)
    td = gguf_tokenizer_dict(model.reader)
    tk, tk_src = build_tokenizer(args.model, td)
    check_tk = manual_tokenizer(td)
    template = field(model.reader, "tokenizer.chat_template")

    import tokenizers
    try:
        import transformers
        tf_ver = transformers.__version__
    except ImportError:
        tf_ver = None
    meta = {
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256(args.model),
        "numpy_version": np.__version__,
        "gguf_version": getattr(gguf, "__version__", None) or _pkg_version("gguf"),
        "tokenizers_version": tokenizers.__version__,
        "transformers_version": tf_ver,
        "tokenizer_source": tk_src,
        "compute": "float64 numpy; dequantized with gguf.quants.dequantize; RoPE on adjacent pairs (2i,2i+1), "
                   f"theta={model.theta}; rms eps={model.eps}; tied output = token_embd (Q8_0); no BOS",
        "topk": TOPK,
        "n_greedy": N_GREEDY,
    }

    prompts = [(n, p, False, None) for n, p in RAW_PROMPTS]
    prompts += [(n, render_chat(template, m), True, m) for n, m in CHAT_PROMPTS]
    records = []
    for name, prompt, chat, msgs in prompts:
        t1 = time.time()
        rec = run_prompt(model, tk, name, prompt, chat, msgs)
        assert rec["token_ids"] == encode(check_tk, prompt), f"tokenizer routes disagree on {name}"
        records.append(rec)
        print(f"[{name}] {len(rec['token_ids'])} tok, {time.time() - t1:.1f}s, min margin "
              f"{min(rec['top2_margin']):.4f}: {rec['greedy_text']!r}", file=sys.stderr)
    with open(os.path.join(args.out, "fixtures.json"), "w") as f:
        json.dump({"meta": meta, "prompts": records}, f, ensure_ascii=False, separators=(",", ":"))

    cases = []
    for text in TOKENIZER_CASES:
        ids = encode(tk, text)
        assert ids == encode(check_tk, text), f"tokenizer routes disagree on {text!r}"
        cases.append({"text": text, "token_ids": ids, "decoded": decode(tk, ids)})
    tmeta = {k: meta[k] for k in ("model_file", "model_sha256", "tokenizers_version", "transformers_version",
                                  "tokenizer_source")}
    tmeta["note"] = "encode(text, add_special_tokens=False): no BOS; control tokens like <|im_start|> parsed as single ids"
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump({"meta": tmeta, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"[done] {time.time() - t0:.1f}s total", file=sys.stderr)


def _pkg_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
