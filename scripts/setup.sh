#!/usr/bin/env bash
# Installs what building and testing need beyond a Rust toolchain and Python 3, only where it is missing:
# protoc (Debian protobuf-compiler, with the well-known .proto files) and the Python packages the tests use
# (`openai`, the official client the HTTP API is tested with; grpcio + grpcio-tools for the Python SDK), and
# Debian's etcd-server (the discovery tests start a real etcd on a free port; install does not start it).
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
if ! command -v etcd >/dev/null; then
  echo "setup: installing etcd-server" >&2
  apt_install etcd-server
fi
if ! python3 -c "import openai, grpc, grpc_tools" 2>/dev/null; then
  echo "setup: installing the Python packages openai, grpcio, grpcio-tools" >&2
  python3 -m pip install -q openai grpcio grpcio-tools
fi
