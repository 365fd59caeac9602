#!/usr/bin/env bash
# Installs what building and testing need beyond a Rust toolchain and Python 3, only where it is missing:
# protoc (Debian protobuf-compiler, with the well-known .proto files) and the Python packages the tests use
# (`openai`, the official client the HTTP API is tested with; grpcio + grpcio-tools for the Python SDK).
set -euo pipefail
apt_install() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@" >/dev/null
}
if ! command -v protoc >/dev/null || [ ! -e /usr/include/google/protobuf/empty.proto ]; then
  echo "setup: installing protobuf-compiler" >&2
  apt_install protobuf-compiler libprotobuf-dev
fi
if ! python3 -c "import openai, grpc, grpc_tools" 2>/dev/null; then
  echo "setup: installing the Python packages openai, grpcio, grpcio-tools" >&2
  python3 -m pip install -q openai grpcio grpcio-tools
fi
