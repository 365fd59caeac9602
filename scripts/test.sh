#!/usr/bin/env bash
# Runs every test: installs what is missing, fetches the default model if needed, builds the release binary (the
# end-to-end tests run it), then the whole workspace's tests in release mode (the engine is too slow unoptimized to
# test on the real model), then compiles the CUDA kernels with NVRTC (no GPU needed) so that a kernel that does not
# compile fails here rather than on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/fetch-model.sh >/dev/null
cargo build --release -p tandem
cargo test --release --workspace
./scripts/check-kernels.sh sm_90
