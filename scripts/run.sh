#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, fetch the default model, build, and serve it as a local
# cluster (router + prefill worker + decode worker in one process). Prints the router's address once it is ready,
# e.g. http://127.0.0.1:8000; Ctrl-C stops it. Extra arguments go to `tandem up` (e.g. --decode 2, --colocated).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/fetch-model.sh >/dev/null
cargo build --release -p tandem
exec ./target/release/tandem up "$@"
