#!/usr/bin/env bash
# A served cluster on one host with a real model: a prefill and a decode worker (`--device cuda`; the prefill worker on
# GPU 0, the decode worker on GPU 1 where the host has two, so their KV moves over the NCCL device link) and a router,
# each its own process. Greedy answers are compared with the CPU's `tandem generate`, then
# `tandem bench serve --target` runs with the KV payloads on the same-host Unix socket link and over gRPC only, two
# rounds, alternating, same binary (docs/kv-links.md). Logs and bench output go to OUTDIR.
#
#   scripts/gpu-serve.sh BINARY MODEL [OUTDIR]     env: DEV=cuda|cpu, PT=prompt tokens (3000), NR=requests (48)
set -u
B="${1:?usage: scripts/gpu-serve.sh BINARY MODEL [OUTDIR]}"; M="${2:?model file}"; OUT="${3:-gpu-serve-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"; export TANDEM_LOG=info NCCL_NVLS_ENABLE=0
DEV=${DEV:-cuda}; PT=${PT:-3000}; NR=${NR:-48}
DGPU=0; [ "$DEV" = cuda ] && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] && DGPU=1
echo "prefill worker on GPU 0, decode worker on GPU $DGPU"
sha256sum "$M" | cut -c1-16
up() { # $1 name, $2 extra worker flags
  $B prefill --model $M --device $DEV --kv-cache-mib 2048 --listen 127.0.0.1:7100 $2 > $OUT/$1-prefill.log 2>&1 &
  $B decode --model $M --device $DEV --gpu $DGPU --kv-cache-mib 4096 --listen 127.0.0.1:7200 --local-prefill-threshold-tokens 0 $2 > $OUT/$1-decode.log 2>&1 &
  $B router --model $M --prefill-worker http://127.0.0.1:7100 --decode-worker http://127.0.0.1:7200 --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 --local-prefill-max-tokens 0 > $OUT/$1-router.log 2>&1 &
  for i in $(seq 1 120); do curl -sf 127.0.0.1:8000/ready >/dev/null && return 0; sleep 0.5; done; echo "$1: not ready"; return 1
}
down() { kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; }
ask() { curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d "{\"model\":\"$(basename "${M%.*}")\",\"prompt\":\"$1\",\"max_tokens\":24,\"temperature\":0}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])'; }
P1="The capital of France is"; P2="Write a haiku about the sea. The sea"
for p in "$P1" "$P2"; do timeout 60 $B generate --model $M --device cpu --raw --prompt "$p" --max-tokens 24 --temperature 0 2>/dev/null > $OUT/cpu_$(echo $p | cut -c1-3).txt; done
for round in 1 2; do for mode in link grpc; do
  flags=""; [ $mode = grpc ] && flags="--no-kv-link"
  up $mode$round "$flags" || { down; continue; }
  if [ $round = 1 ]; then for p in "$P1" "$P2"; do
    got=$(ask "$p"); want=$(cat $OUT/cpu_$(echo $p | cut -c1-3).txt)
    [ "$got" = "$want" ] && echo "$mode: greedy equals CPU: $p" || echo "$mode: DIFFERS: [$got] vs CPU [$want]"
  done; fi
  timeout 200 $B bench serve --target http://127.0.0.1:8001 --model $M --requests $NR --concurrency 8 --prompt-tokens $PT --output-tokens 16 > $OUT/$mode$round-bench.log 2>&1; echo "$mode round $round: bench rc=$?"
  tail -4 $OUT/$mode$round-bench.log
  echo "$mode: unix socket links $(grep -c 'kv link connected' $OUT/$mode$round-prefill.log), device links $(grep -c 'kv device link opened' $OUT/$mode$round-prefill.log), failed device links $(grep -c 'device link not opened\|device link failed' $OUT/$mode$round-prefill.log)"
  down; sleep 1
done; done
timeout 120 $B bench transfer --transport unix --mib 256 > $OUT/transfer-unix.log 2>&1; echo "transfer unix rc=$?"; tail -6 $OUT/transfer-unix.log
