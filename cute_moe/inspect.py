"""Cross-compile every shipped kernel configuration without a GPU and report its resources and SASS.

    python -m cute_moe.inspect --arch sm_90a --json

For each kernel: registers per thread (from the cubin's section table), shared memory per CTA, and
counts of the SASS instructions that show the kernel is on the fast path (HGMMA/QGMMA tensor-core
ops, UTMALDG/UTMASTG bulk tensor copies) and the ones that must not be there (LDL/STL: local-memory
spills). SASS comes from nvdisasm (pip package nvidia-cuda-nvdisasm >= 13.4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter

SASS_OPS = ("HGMMA", "QGMMA", "UTMALDG", "UTMASTG", "LDL", "STL")


def shipped_kernels(arch: str):
    """(name, dtype, KernelKey) for every kernel configuration the library can pick."""
    import torch

    from .gemm.config import GemmConfig
    from .gemm.interface import KernelKey

    if arch != "sm_90a":
        return []
    bf16 = torch.bfloat16
    out = []
    # representative static sizes; tiles and epilogues are what vary between shipped kernels
    e, h, i = 8, 4096, 1024
    for tile in (GemmConfig(128, 256), GemmConfig(64, 256), GemmConfig(64, 128), GemmConfig(64, 64)):
        for act in ("silu", "gelu", "swiglu_oai"):
            key = KernelKey(arch, bf16, bf16, tile, act, False, False, False, e, 2 * i, h, 132)
            out.append((f"gemm1_{act}_{tile.tile_m}x{tile.tile_n}", "bf16", key))
        key = KernelKey(arch, bf16, bf16, tile, "none", False, True, False, e, h, i, 132)
        out.append((f"gemm2_rowscale_{tile.tile_m}x{tile.tile_n}", "bf16", key))
    out.append(("gemm1_swiglu_oai_bias_128x256", "bf16",
                KernelKey(arch, bf16, bf16, GemmConfig(128, 256), "swiglu_oai", True, False, False, e, 2 * i, h, 132)))
    out.append(("gemm2_bias_128x256", "bf16",
                KernelKey(arch, bf16, bf16, GemmConfig(128, 256), "none", True, False, False, e, h, i, 132)))
    out.append(("gemm1_silu_masked_64x256", "bf16",
                KernelKey(arch, bf16, bf16, GemmConfig(64, 256), "silu", False, False, True, e, 2 * i, h, 132)))
    for act in ("silu", "none"):
        out.append((f"gemm_{act}_128x256_cluster2", "bf16",
                    KernelKey(arch, bf16, bf16, GemmConfig(128, 256, 2), act, False, act == "none", False, e,
                              2 * i if act != "none" else h, h if act != "none" else i, 132)))
    f8 = torch.float8_e4m3fn
    for mode, tile in (("tensor", GemmConfig(128, 256)), ("token", GemmConfig(128, 256)),
                       ("block", GemmConfig(128, 128)), ("block", GemmConfig(64, 128)),
                       ("block", GemmConfig(128, 128, overlap_promotion=True)),
                       ("block", GemmConfig(128, 128, 2, overlap_promotion=True))):
        for act in ("silu", "none"):
            n, kk = (2 * i, h) if act != "none" else (h, i)
            name = f"fp8_{mode}_{'gemm1_' + act if act != 'none' else 'gemm2'}_{tile.tile_m}x{tile.tile_n}"
            name += ("_overlap" if tile.overlap_promotion else "") + ("_cluster2" if tile.cluster_m > 1 else "")
            out.append((name, "fp8",
                        KernelKey(arch, f8, bf16, tile, act, False, False, False, e, n, kk, 132, mode)))
    for act, tile in (("silu", GemmConfig(64, 96)), ("none", GemmConfig(64, 160)),  # in-between widths
                      ("none", GemmConfig(128, 224))):
        n, kk = (2 * i, h) if act != "none" else (h, i)
        out.append((f"gemm_{act}_{tile.tile_m}x{tile.tile_n}", "bf16",
                    KernelKey(arch, bf16, bf16, tile, act, False, False, False, e, n, kk, 132)))
    for act, tile in (("silu", GemmConfig(64, 128)), ("none", GemmConfig(128, 256))):
        n, kk = (2 * i, h) if act != "none" else (h, i)
        out.append((f"gemm_{act}_{tile.tile_m}x{tile.tile_n}_prefetch", "bf16",
                    KernelKey(arch, bf16, bf16, tile, act, False, False, False, e, n, kk, 132, "none", True)))
    out.append(("fp8_block_gemm1_silu_64x128_prefetch", "fp8",
                KernelKey(arch, f8, bf16, GemmConfig(64, 128), "silu", False, False, False, e, 2 * i, h, 132, "block",
                          True)))
    out.append(("gemm_plain_128x256", "bf16",
                KernelKey(arch, bf16, bf16, GemmConfig(128, 256), "none", False, False, False, e, h, i, 132)))
    # dynamic tile scheduling (prefill with < 1024 rows per expert), as the layer launches them
    dyn = GemmConfig(128, 256, dynamic=True)
    out.append(("gemm1_silu_128x256_dynamic_prefetch", "bf16",
                KernelKey(arch, bf16, bf16, dyn, "silu", False, False, False, e, 2 * i, h, 132, "none", True)))
    out.append(("gemm2_rowscale_128x256_dynamic", "bf16",
                KernelKey(arch, bf16, bf16, dyn, "none", False, True, False, e, h, i, 132)))
    out.append(("gemm_none_128x224_dynamic", "bf16",
                KernelKey(arch, bf16, bf16, GemmConfig(128, 224, dynamic=True), "none", False, False, False, e, h, i,
                          132)))
    for act, tile in (("silu", GemmConfig(128, 128, overlap_promotion=True, dynamic=True)),
                      ("none", GemmConfig(128, 128, dynamic=True))):
        n, kk = (2 * i, h) if act != "none" else (h, i)
        out.append((f"fp8_block_{'gemm1_' + act if act != 'none' else 'gemm2'}_128x128"
                    f"{'_overlap' if tile.overlap_promotion else ''}_dynamic", "fp8",
                    KernelKey(arch, f8, bf16, tile, act, False, False, False, e, n, kk, 132, "block")))
    out.append(("fp8_token_gemm1_silu_128x256_dynamic", "fp8",
                KernelKey(arch, f8, bf16, dyn, "silu", False, False, False, e, 2 * i, h, 132, "token")))
    return out


def nvdisasm_path() -> str:
    """nvdisasm from the nvidia-cuda-nvdisasm wheel, else from PATH."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for sub in ("cu13/bin", "cuda_nvdisasm/bin"):
                p = os.path.join(root, sub, "nvdisasm")
                if os.path.exists(p):
                    return p
    except ImportError:
        pass
    p = shutil.which("nvdisasm")
    if p is None:
        raise RuntimeError("nvdisasm not found: pip install 'nvidia-cuda-nvdisasm>=13.4'")
    return p


def cubin_registers(path: str) -> int:
    """Registers per thread: the EIATTR_REGCOUNT (0x2f) attributes of the cubin's `.nv.info` section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not a 64-bit ELF cubin")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + n * shentsize) for n in range(shnum)]
    strtab_off = sections[shstrndx][4]
    regs = 0
    for sec in sections:
        start = strtab_off + sec[0]
        if data[start:data.index(b"\0", start)] != b".nv.info":
            continue
        pos, end = sec[4], sec[4] + sec[5]
        while pos < end:
            fmt, attr, size = struct.unpack_from("<BBH", data, pos)
            if fmt == 4:  # EIFMT_SVAL: `size` payload bytes follow
                if attr == 0x2F:
                    regs = max(regs, struct.unpack_from("<I", data, pos + 8)[0])
                pos += 4 + size
            else:
                pos += 4
    return regs


def count_sass(path: str) -> dict:
    """Opcode counts for SASS_OPS in the cubin."""
    text = subprocess.run([nvdisasm_path(), "-c", path], check=True, capture_output=True, text=True).stdout
    ops = Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text))
    return {op: ops.get(op, 0) for op in SASS_OPS}


def inspect_kernel(name: str, dtype: str, key) -> dict:
    from .gemm.interface import _compile

    rec = {"name": name, "arch": key.arch, "dtype": dtype, "compiled": False, "registers": 0,
           "smem_bytes": 0, "sass": {op: 0 for op in SASS_OPS}}
    with tempfile.TemporaryDirectory() as d:
        try:
            fn = _compile(key, f"--keep-cubin --dump-dir {d}")
        except Exception as ex:  # reported, not raised: the report covers every kernel
            rec["error"] = f"{type(ex).__name__}: {ex}"[:2000]
            return rec
        cubins = [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cubin")]
        if not cubins:
            rec["error"] = "compiled, but no cubin was written"
            return rec
        rec["compiled"] = True
        rec["smem_bytes"] = int(fn.smem_bytes)
        rec["registers"] = max(cubin_registers(c) for c in cubins)
        counts = Counter()
        for c in cubins:
            counts.update(count_sass(c))
        rec["sass"] = {op: int(counts[op]) for op in SASS_OPS}
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a", choices=["sm_90a", "sm_100a"])
    ap.add_argument("--json", action="store_true", help="print the JSON report only")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    kernels = [k for k in shipped_kernels(args.arch) if args.filter in k[0]]
    report = {"kernels": [inspect_kernel(*k) for k in kernels]}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in report["kernels"]:
            print(f"{r['name']:40s} {r['dtype']:5s} compiled={r['compiled']} regs={r['registers']:3d} "
                  f"smem={r['smem_bytes']:6d} " + " ".join(f"{k}={v}" for k, v in r["sass"].items()))
    return 0 if all(r["compiled"] for r in report["kernels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
