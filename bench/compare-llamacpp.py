#!/usr/bin/env python3
"""Runs Tandem's engine benchmark and llama.cpp's llama-bench on the same model in the same run, alternating, and
prints the ratios; optionally also perplexity with both tools on one text file.

llama.cpp is the peer most users would pick for CPU inference. It is not part of this repository: build
`llama-bench` and `llama-perplexity` from the `llama-cpp-python` source package on PyPI (its vendor/llama.cpp,
`cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target
llama-bench llama-perplexity`) and pass the folder holding the binaries.

    python3 bench/compare-llamacpp.py --llama-bin DIR [--model PATH] [--rounds 2] [--ppl-file FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser("~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def llama_bench(bin_dir, model, threads):
    out = subprocess.run(
        [os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-p", "128,512", "-n", "128", "-r", "3", "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    res = {}
    for r in json.loads(out):
        key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        res[key] = r["avg_ts"]
    return res


def tandem_bench(model, threads):
    out = subprocess.run(
        [os.path.join(ROOT, "target/release/tandem"), "--threads", str(threads), "bench", "engine", "--model", model, "--json", "--runs", "3", "--decode-steps", "64"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", required=True, help="folder with llama-bench and llama-perplexity")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both tools")
    ap.add_argument("--ppl-file", help="also compare perplexity on this text file (context 512)")
    a = ap.parse_args()

    peer = {"pp128": [], "pp512": [], "tg128": []}
    ours = {"pp128": [], "pp512": [], "b1": [], "b4": [], "b16": []}
    last = None
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds} ...", file=sys.stderr)
        for k, v in llama_bench(a.llama_bin, a.model, a.threads).items():
            peer[k].append(v)
        t = tandem_bench(a.model, a.threads)
        last = t
        for p in t["prefill"]:
            ours[f"pp{p['tokens']}"].append(p["tokens_per_s"])
        for d in t["decode"]:
            ours[f"b{d['batch']}"].append(d["tokens_per_s"])
    med = lambda v: statistics.median(v)
    print(f"{'figure':<28}{'llama.cpp':>12}{'tandem':>12}{'ratio':>8}")
    for label, pk, ok in [("prefill 128 tokens (tok/s)", "pp128", "pp128"), ("prefill 512 tokens (tok/s)", "pp512", "pp512"), ("decode batch 1 (tok/s)", "tg128", "b1")]:
        p, o = med(peer[pk]), med(ours[ok])
        print(f"{label:<28}{p:>12.1f}{o:>12.1f}{o / p:>8.2f}")
    b1 = med(ours["b1"])
    for b in (4, 16):
        o = med(ours[f"b{b}"])
        print(f"{'decode batch %d (tok/s)' % b:<28}{'':>12}{o:>12.1f}{o / b1:>7.2f}x of batch 1")
    print(f"peak RSS {last['peak_rss_bytes'] / 2**20:.1f} MiB; model {last['model_weight_bytes'] / 2**20:.1f} MiB; KV budget {last['kv_cache_bytes'] / 2**20:.1f} MiB")
    print(f"decode floor {last['decode_bytes_per_token_floor'] / 1e6:.1f} MB/token; read bandwidth {last['memory_read_bandwidth_gb_s']:.1f} GB/s; batch-1 ceiling {last['decode_batch1_ceiling_tok_s']:.0f} tok/s")
    if a.ppl_file:
        out = subprocess.run([os.path.join(a.llama_bin, "llama-perplexity"), "-m", a.model, "-f", a.ppl_file, "-c", "512", "-t", str(a.threads)], capture_output=True, text=True)
        peer_ppl = next((l.split("PPL = ")[1].split()[0] for l in (out.stdout + out.stderr).splitlines() if "Final estimate" in l), "?")
        o = subprocess.run([os.path.join(ROOT, "target/release/tandem"), "eval", "perplexity", "--model", a.model, "--file", a.ppl_file, "--context", "512", "--json"], check=True, capture_output=True, text=True)
        print(f"perplexity (context 512) of {a.ppl_file}: llama.cpp {peer_ppl}, tandem {json.loads(o.stdout)['perplexity']:.4f}")


if __name__ == "__main__":
    main()
