#!/usr/bin/env bash
# Every GPU check and benchmark of record in one go, on a CUDA 13 host, for a `tandem` binary built elsewhere
# (docs/gpu.md): the kernel and model-level checks with an f16 and a kivi2 cache, the Llama-3.1-8B-shaped prefill and
# decode figures against their floors, one layer's decode attention over each cache format at 8k context, and, on a
# host with two GPUs, the NCCL KV transfer (f16 with the prefill overlap figure, then int4). Each step has a time
# limit and its own log under OUTDIR; a short table of the lines that matter comes last. Exit status: the number of
# steps that failed.
#
#   scripts/gpu-run.sh BINARY [OUTDIR]      (OUTDIR defaults to ./gpu-run-<date>)
set -uo pipefail
bin="${1:?usage: scripts/gpu-run.sh BINARY [OUTDIR]}"
out="${2:-gpu-run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
failed=0
summary=()

# step NAME LIMIT_S PATTERN -- ARGS...: runs `$bin ARGS` into $out/NAME.log; PATTERN picks the lines for the table.
step() {
  local name=$1 limit=$2 pattern=$3
  shift 4
  echo "== $name: $bin $*" >&2
  timeout "$limit" "$bin" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1))
    summary+=("$name: FAILED (exit $rc; last line: $(tail -n 1 "$out/$name.log"))")
  fi
  while IFS= read -r line; do summary+=("$name: $line"); done < <(grep -E "$pattern" "$out/$name.log")
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
gpus=$(command -v nvidia-smi >/dev/null && nvidia-smi --list-gpus | wc -l || echo 0)

step check-f16 240 "^kernel checks|^check|FAILED|skipped" -- bench gpu --check-only
step check-kivi2 240 "^kernel checks|^check|^kivi2|FAILED" -- bench gpu --check-only --kv-format kivi2
step llama-f16 300 "^ceilings|^prefill|^decode batch" -- \
  bench gpu --no-check --shape llama-3.1-8b --batch 1,64 --context 1024 --prefill-tokens 2048
step attention-8k 200 "^decode attention alone" -- \
  bench gpu --no-check --shape llama-3.1-8b --batch 32 --context 8192 --prefill-tokens 512 --runs 3 \
  --attention-formats f16,int8,int4,kivi2
if [ "$gpus" -ge 2 ]; then
  step nccl-f16 400 "^prefill of|cache, .* tokens:|^peer copy" -- bench transfer --transport nccl --with-prefill
  step nccl-int4 200 "cache, .* tokens:|^peer copy" -- bench transfer --transport nccl --kv-format int4
else
  summary+=("nccl: not run ($gpus GPU(s); the transfer needs two)")
fi

echo
echo "== summary ($out)"
printf '%s\n' "${summary[@]}"
exit "$failed"
