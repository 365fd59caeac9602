#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model, build, and generate from a prompt.
# Extra arguments go to `tandem generate` (e.g. --prompt "..." --max-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --release -p tandem
if [ $# -eq 0 ]; then
  set -- --prompt "What is the capital of France?"
fi
exec ./target/release/tandem generate "$@"
