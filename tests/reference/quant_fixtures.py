#!/usr/bin/env python3
"""Golden dequantization fixtures for the engine's GGML block decoders.

What it does
------------
For each GGML type in TYPES it builds two blocks' worth of deterministic pseudo-random raw bytes
(``numpy.random.default_rng(seed)``, one fixed seed per type, see SEEDS) and dequantizes them with
the independent reference implementation in the ``gguf`` Python package::

    gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8), gguf.GGMLQuantizationType.X)

Random bytes are fine for the quantized payload (nibbles, 6-bit scales, int8 quants), but random
f16 scale fields could be Inf/NaN or huge, so every f16 scale field of every block (``d``, ``m``,
``dmin`` depending on the type) is overwritten with a finite f16 value drawn uniformly from
[0.01, 0.1]. For F16/BF16 the "blocks" are 64 single elements drawn from finite float values.

Block layouts (bytes per block / elements per block), offsets within a block:

    F16   2/1     one IEEE half                      (64 elements generated)
    BF16  2/1     one bfloat16                       (64 elements generated)
    Q8_0  34/32   d f16 @0, 32 x i8 @2
    Q4_0  18/32   d f16 @0, 16 bytes nibbles @2
    Q4_1  20/32   d f16 @0, m f16 @2, 16 bytes nibbles @4
    Q4_K  144/256 d f16 @0, dmin f16 @2, 12 bytes scales @4, 128 bytes qs @16
    Q5_K  176/256 d f16 @0, dmin f16 @2, 12 bytes scales @4, 32 bytes qh @16, 128 bytes qs @48
    Q6_K  210/256 128 bytes ql @0, 64 bytes qh @128, 16 x i8 scales @192, d f16 @208 (at the END)

Output: ``tests/reference/fixtures/dequant.json``::

    {"meta": {"gguf_version": "...", "numpy_version": "...", "seeds": {...}, ...},
     "cases": [{"type": "Q4_K", "raw_hex": "...", "values": [...]}, ...]}

``raw_hex`` is the whole raw buffer (all blocks, little-endian as on disk) in lowercase hex;
``values`` are the float32 results of gguf's dequantizer rounded to 7 significant digits
(compare with a relative tolerance of ~1e-6, not bit-exactly).

How to run
----------
    python3 tests/reference/quant_fixtures.py

Needs numpy and gguf. Deterministic: re-running produces an identical file (for the same gguf
version). Exits non-zero if gguf cannot dequantize a type or produces non-finite values.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path

import numpy as np
import gguf

OUT_PATH = Path(__file__).resolve().parent / "fixtures" / "dequant.json"

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
SEEDS = {name: 1000 + i for i, name in enumerate(TYPES)}

N_BLOCKS = 2  # quantized types
N_FLOAT_ELEMS = 64  # F16 / BF16

# name -> (bytes per block, elements per block, byte offsets of f16 scale fields in a block)
LAYOUT = {
    "F16": (2, 1, []),
    "BF16": (2, 1, []),
    "Q8_0": (34, 32, [0]),  # d
    "Q4_0": (18, 32, [0]),  # d
    "Q4_1": (20, 32, [0, 2]),  # d, m
    "Q4_K": (144, 256, [0, 2]),  # d, dmin
    "Q5_K": (176, 256, [0, 2]),  # d, dmin
    "Q6_K": (210, 256, [208]),  # d at the end
}

SCALE_LO, SCALE_HI = 0.01, 0.1


def make_raw(name: str) -> bytes:
    rng = np.random.default_rng(SEEDS[name])
    if name == "F16":
        vals = rng.uniform(-4.0, 4.0, N_FLOAT_ELEMS).astype("<f2")
        return vals.tobytes()
    if name == "BF16":
        # bfloat16 = upper 16 bits of a float32 (truncation; any finite f32 gives a finite bf16
        # here since |v| <= 4).
        vals = rng.uniform(-4.0, 4.0, N_FLOAT_ELEMS).astype("<f4")
        return (vals.view("<u4") >> 16).astype("<u2").tobytes()

    block_bytes, _, scale_offsets = LAYOUT[name]
    raw = bytearray(rng.integers(0, 256, N_BLOCKS * block_bytes, dtype=np.uint8).tobytes())
    for b in range(N_BLOCKS):
        for off in scale_offsets:
            s = np.array(rng.uniform(SCALE_LO, SCALE_HI), dtype="<f2")
            pos = b * block_bytes + off
            raw[pos : pos + 2] = s.tobytes()
    return bytes(raw)


def round_sig(v: float, digits: int = 7) -> float:
    return float(f"{v:.{digits}g}")


def main() -> int:
    gguf_version = importlib.metadata.version("gguf")
    cases = []
    unsupported = []
    for name in TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block_bytes, block_elems, _ = LAYOUT[name]
        # Cross-check our layout table against gguf's own.
        if tuple(gguf.GGML_QUANT_SIZES[qtype]) != (block_elems, block_bytes):
            raise SystemExit(f"{name}: layout mismatch, gguf says {gguf.GGML_QUANT_SIZES[qtype]}")

        raw = make_raw(name)
        n_elems = (len(raw) // block_bytes) * block_elems
        try:
            vals = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8), qtype)
        except NotImplementedError as e:
            unsupported.append(name)
            print(f"{name}: NOT supported by gguf.quants.dequantize: {e}", file=sys.stderr)
            continue
        vals = np.asarray(vals, dtype=np.float32).reshape(-1)
        if vals.size != n_elems:
            raise SystemExit(f"{name}: expected {n_elems} values, gguf returned {vals.size}")
        if not np.all(np.isfinite(vals)):
            raise SystemExit(f"{name}: non-finite values in dequantized output")

        values = [round_sig(float(v)) for v in vals]
        assert all(math.isfinite(v) for v in values)
        cases.append({"type": name, "raw_hex": raw.hex(), "values": values})
        print(f"{name}: {len(raw)} bytes -> {vals.size} values, "
              f"range [{vals.min():.6g}, {vals.max():.6g}]")

    doc = {
        "meta": {
            "gguf_version": gguf_version,
            "numpy_version": np.__version__,
            "generator": "tests/reference/quant_fixtures.py",
            "seeds": SEEDS,
            "blocks_per_quantized_case": N_BLOCKS,
            "elements_per_float_case": N_FLOAT_ELEMS,
            "scale_range": [SCALE_LO, SCALE_HI],
            "values_significant_digits": 7,
        },
        "cases": cases,
    }
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT_PATH} ({OUT_PATH.stat().st_size} bytes)")
    if unsupported:
        print(f"unsupported types: {unsupported}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
