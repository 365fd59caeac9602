#!/usr/bin/env bash
# Generates the Python SDK (messages + grpcio stubs) from proto/ into OUT_DIR (default: this folder), importable as
# `tandem.v1.*`. Needs `pip install grpcio grpcio-tools`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
mkdir -p "$out"
python3 -m grpc_tools.protoc -I "$here/../../proto" --python_out="$out" --grpc_python_out="$out" \
  "$here"/../../proto/tandem/v1/*.proto
