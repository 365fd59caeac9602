#!/usr/bin/env python3
"""PyTorch + transformers next to Tandem's CUDA backend, on one GPU host, in one run.

1. Correctness: builds a SmolLM2-135M-shaped Llama with seeded random bf16 weights in PyTorch, saves it as an HF
   directory (config.json + safetensors), and writes reference.json beside it: a prompt, PyTorch's float32 logits at
   its last position, and PyTorch's greedy continuation. `tandem bench gpu --reference DIR --check-only` loads the
   same files on the GPU and must agree (rel. error < 2e-2, greedy tokens with PyTorch's fed back).
2. Speed baseline: a Llama-3.1-8B-shaped model with random bf16 weights in transformers (SDPA attention, static KV
   cache through `generate(cache_implementation="static")`, eager: no torch.compile), greedy decode at batch 1 and 64 with a 1,024-token
   context, and a 2,048-token prefill; then `tandem bench gpu --shape llama-3.1-8b` on the same card, and the
   ratios. Decode time per step is the difference of two generate calls (N2 - N1 new tokens), so the prompt's
   prefill cancels out.

Usage (on the GPU host): python3 bench/gpu-torch.py --tandem .gpu/tandem [--work /tmp/tandem-torch]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=8192)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, max_position_embeddings=8192)


def build(shape, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, attn_implementation="sdpa", torch_dtype="bfloat16")
    torch.set_default_device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    torch.set_default_device("cpu")
    # The documented baseline is eager PyTorch; recent transformers would otherwise compile the static-cache step.
    model.generation_config.disable_compile = True
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            else:
                p.uniform_(0.8, 1.2)  # norm weights
    return model.eval()


def reference(work, seed):
    model = build(SMOLLM2, seed)
    model.save_pretrained(work, safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (77,), generator=g).tolist()
    f32 = model.float()
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        logits = f32(ids).logits[0, -1].float()
        greedy = [int(logits.argmax())]
        for _ in range(15):
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]], device="cuda")], dim=1)
            greedy.append(int(f32(ids).logits[0, -1].argmax()))
    with open(os.path.join(work, "reference.json"), "w") as f:
        json.dump({"prompt": prompt, "logits": logits.tolist(), "greedy": greedy}, f)
    del model, f32
    torch.cuda.empty_cache()


def timed(fn, runs=3):
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def baseline(context, batches, prefill_tokens):
    model = build(LLAMA_8B, 1)
    vocab = LLAMA_8B["vocab_size"]
    out = {}
    ids = torch.randint(0, vocab, (1, prefill_tokens), device="cuda")
    with torch.no_grad():
        def prefill():
            h = model.model(input_ids=ids).last_hidden_state[:, -1]
            model.lm_head(h).argmax(-1)
        out["prefill_ms"] = timed(prefill) * 1e3
    for b in batches:
        prompt = torch.randint(0, vocab, (b, context), device="cuda")
        mask = torch.ones_like(prompt)

        def gen(n):
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
        n1, n2 = 8, 40
        gen(n2)  # warm-up (and any lazy set-up of the static cache)
        t1, t2 = timed(lambda: gen(n1), 2), timed(lambda: gen(n2), 2)
        out[f"decode_b{b}_ms"] = (t2 - t1) / (n2 - n1) * 1e3
    del model
    torch.cuda.empty_cache()
    return out


def tandem_numbers(binary, work, context, batches, prefill_tokens):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    check = subprocess.run([binary, "bench", "gpu", "--reference", work, "--check-only", "--no-check"],
                           capture_output=True, text=True, env=env)
    print(check.stdout + check.stderr, end="")
    if check.returncode != 0:
        sys.exit("tandem disagrees with PyTorch")
    run = subprocess.run([binary, "bench", "gpu", "--shape", "llama-3.1-8b", "--no-check", "--context", str(context),
                          "--batch", ",".join(map(str, batches)), "--prefill-tokens", str(prefill_tokens)],
                         capture_output=True, text=True, env=env, check=True)
    print(run.stdout, end="")
    out = {}
    m = re.search(r"prefill \d+ tokens: ([\d.]+) ms", run.stdout)
    out["prefill_ms"] = float(m.group(1))
    for b, ms in re.findall(r"decode batch (\d+) at \d+ context: ([\d.]+) ms/step", run.stdout):
        out[f"decode_b{b}_ms"] = float(ms)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tandem", required=True, help="the tandem binary")
    ap.add_argument("--work", default="/tmp/tandem-torch", help="where the reference model is written")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    os.makedirs(a.work, exist_ok=True)
    reference(a.work, 7)
    torch_ms = baseline(a.context, batches, a.prefill_tokens)
    tandem_ms = tandem_numbers(a.tandem, a.work, a.context, batches, a.prefill_tokens)
    print(f"\n{'figure (llama-3.1-8b shape, bf16)':<40} {'pytorch':>10} {'tandem':>10} {'speed-up':>9}")
    for key in ["prefill_ms"] + [f"decode_b{b}_ms" for b in batches]:
        p, t = torch_ms[key], tandem_ms[key]
        print(f"{key:<40} {p:>8.2f}ms {t:>8.2f}ms {p / t:>8.2f}x")


if __name__ == "__main__":
    main()
