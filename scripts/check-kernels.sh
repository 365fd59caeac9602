#!/usr/bin/env bash
# Compiles the CUDA kernels (engine/src/backend/cuda/kernels.cu) with NVRTC on a machine without a GPU or a CUDA
# install, exactly as the backend does at start-up (C++17, -default-device), for one architecture (default sm_90;
# pass another as $1). NVRTC and the CUDA headers come from NVIDIA's PyPI wheels (nvidia-cuda-nvrtc,
# nvidia-cuda-runtime, nvidia-cuda-crt), fetched once into $TANDEM_CACHE/nvrtc (default ~/.cache/tandem). It catches
# compile errors before a GPU run; it runs nothing.
set -euo pipefail
arch="${1:-sm_90}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${TANDEM_CACHE:-$HOME/.cache/tandem}/nvrtc"
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -e "$dir/nvidia/cu13/include/crt/mma.h" ]; then
  echo "fetching NVRTC and the CUDA headers from PyPI ..." >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt >&2
  mkdir -p "$dir"
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
fi
LD_LIBRARY_PATH="$dir/nvidia/cu13/lib" python3 - "$root/engine/src/backend/cuda/kernels.cu" "$arch" \
  "$dir/nvidia/cu13/include" <<'PY'
import ctypes, sys
source, arch, include = sys.argv[1:4]
nvrtc = ctypes.CDLL("libnvrtc.so.13")
prog = ctypes.c_void_p()
if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), open(source, "rb").read(), b"kernels.cu", 0, None, None):
    sys.exit("nvrtcCreateProgram failed")
opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", f"-I{include}"]
argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
status = nvrtc.nvrtcCompileProgram(prog, len(opts), argv)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode(), file=sys.stderr)
if status != 0:
    sys.exit(f"kernels.cu does not compile for {arch} (nvrtc status {status})")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
print(f"kernels.cu compiles for {arch}: {size.value} bytes of PTX")
PY
