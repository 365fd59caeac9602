#!/usr/bin/env python3
"""Aggregate output tokens/s of 4 concurrent streams x 128 new tokens: llama.cpp's server vs `tandem up`
(disaggregated and colocated), measured one after the other in the same run with the same client and requests.

Usage: python3 bench/compare-serve-llamacpp.py --llama-server PATH [--model GGUF] [--streams 4] [--tokens 128]
Each server gets 2 threads; requests go to /v1/completions with ignore_eos so every stream makes exactly --tokens.
"""

import argparse
import json
import os
import subprocess
import threading
import time
import urllib.request

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle on a stormy night."


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def wait_ready(url, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("server did not become ready")


def drive(base, model, streams, tokens, rounds):
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    post(base + "/v1/completions", {**body, "max_tokens": 8})  # warm-up
    counts = []

    def worker():
        for _ in range(rounds):
            counts.append(post(base + "/v1/completions", body)["usage"]["completion_tokens"])

    t = time.time()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t
    return sum(counts) / wall, sum(counts), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tandem", default="target/release/tandem")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    setups = [
        ("llama.cpp server", [a.llama_server, "-m", a.model, "-t", "2", "-np", str(a.streams), "-c", "4096",
                              "--port", "8791", "--host", "127.0.0.1"], "http://127.0.0.1:8791"),
        ("tandem up (1P+1D)", [a.tandem, "up", "--model", a.model, "--threads", "2", "--http", "127.0.0.1:8792"],
         "http://127.0.0.1:8792"),
        ("tandem up --colocated", [a.tandem, "up", "--colocated", "--model", a.model, "--threads", "2", "--http",
                                   "127.0.0.1:8793"], "http://127.0.0.1:8793"),
    ]
    results = {}
    for name, cmd, base in setups:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base, proc)
            with urllib.request.urlopen(base + "/v1/models") as r:
                model = json.load(r)["data"][0]["id"]
            tps, n, wall = drive(base, model, a.streams, a.tokens, a.rounds)
            results[name] = tps
            print(f"{name:24s} {tps:7.1f} output tok/s  ({n} tokens in {wall:.1f} s, {a.streams} streams)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = results["llama.cpp server"]
    for name, v in results.items():
        print(f"{name:24s} x{v / base:.2f} of llama.cpp server")


if __name__ == "__main__":
    main()
