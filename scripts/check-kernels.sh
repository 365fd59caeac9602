#!/usr/bin/env bash
# Compiles the CUDA kernels (engine/src/backend/cuda/kernels.cu, then the other .cu files there in name order, as
# one source) with NVRTC on a machine without a GPU or a CUDA
# install, exactly as the backend does at start-up (C++17, -default-device), for one architecture (default sm_90;
# pass another as $1). NVRTC and the CUDA headers come from NVIDIA's PyPI wheels (nvidia-cuda-nvrtc,
# nvidia-cuda-runtime, nvidia-cuda-crt, and ptxas from nvidia-cuda-nvcc), fetched once into $TANDEM_CACHE/nvrtc
# (default ~/.cache/tandem). The PTX is then assembled with ptxas as the driver would, which catches what NVRTC lets
# through (an instruction the architecture lacks) and reports each kernel's registers; any register spill fails the
# check (`TANDEM_KERNELS_SHOWN=N` lists the N kernels with the most registers; default 4; `TANDEM_KERNELS_CUBIN=PATH`
# keeps the assembled cubin there, for cuobjdump -sass). It runs nothing.
set -euo pipefail
arch="${1:-sm_90}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${TANDEM_CACHE:-$HOME/.cache/tandem}/nvrtc"
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -e "$dir/nvidia/cu13/include/crt/mma.h" ] ||
  [ ! -e "$dir/nvidia/cu13/bin/ptxas" ]; then
  echo "fetching NVRTC and the CUDA headers from PyPI ..." >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt \
    nvidia-cuda-nvcc >&2
  mkdir -p "$dir"
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
  chmod +x "$dir/nvidia/cu13/bin/ptxas"
fi
ptx=$(mktemp --suffix=.ptx)
trap 'rm -f "$ptx" "$ptx.cubin"' EXIT
src="$root/engine/src/backend/cuda"
# kernels.cu (the shared definitions) first, then the other .cu files in name order: the order of module.rs's SOURCE.
others=$(ls "$src"/*.cu | grep -v '/kernels\.cu$' | sort)
LD_LIBRARY_PATH="$dir/nvidia/cu13/lib" python3 - "$arch" "$dir/nvidia/cu13/include" "$ptx" \
  "$src/kernels.cu" $others <<'PY'
import ctypes, sys
arch, include, out = sys.argv[1:4]
code = b"".join(open(f, "rb").read() for f in sys.argv[4:])
nvrtc = ctypes.CDLL("libnvrtc.so.13")
prog = ctypes.c_void_p()
if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code, b"kernels.cu", 0, None, None):
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
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(prog, ptx)
open(out, "wb").write(ptx.value)
print(f"kernels.cu compiles for {arch}: {size.value} bytes of PTX")
PY
"$dir/nvidia/cu13/bin/ptxas" -arch="$arch" -v "$ptx" -o "$ptx.cubin" 2>&1 | python3 -c '
import os, re, sys
kernels, name, spills = {}, None, []
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(\w+).", line)
    if m: name = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name and (int(m.group(1)) or int(m.group(2))): spills.append(name)
    m = re.search(r"Used (\d+) registers", line)
    if m and name: kernels[name] = int(m.group(1))
if not kernels: sys.exit("ptxas assembled no kernels")
top = sorted(kernels.items(), key=lambda kv: -kv[1])[:int(os.environ.get("TANDEM_KERNELS_SHOWN", "4"))]
print(f"ptxas: {len(kernels)} kernels; most registers: " + ", ".join(f"{k} {v}" for k, v in top))
if spills: sys.exit("register spills in: " + ", ".join(spills))
'
if [ -n "${TANDEM_KERNELS_CUBIN:-}" ]; then cp "$ptx.cubin" "$TANDEM_KERNELS_CUBIN"; fi
