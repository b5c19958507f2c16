"""What the decode kernel compiles to on Hopper, counted without a GPU.

Decode streams the KV cache: at the bandwidth limit its time is bytes over bandwidth, and the
kernel only stays there if the instructions it issues per byte stay few. This compiles the
decode variant of `_paged_attention_kernel` ahead of time for sm_90 (the installed Triton ships
ptxas and nvdisasm, so no GPU is needed) with exactly the constexprs and specializations
`paged_attention` would pass for the attn_bench shape (32 query / 8 KV heads, head_dim 128,
block 16, contiguous cache, head-major fp8 scales), and counts the machine instructions of the
tile loop: the one that runs for every full K/V tile (the masked one runs at most once per
program). Each warp of a program runs the whole loop, so a tile costs

    warp instructions per tile = loop instructions x num_warps

and the figure to compare across caches is that over the tile's K/V bytes (BLOCK_N keys x D x
(K and V) x the element size, plus the fp8 scales). Static counts are not time: they say which
variant issues fewer instructions per byte, and the GPU says whether that is faster
(benchmarks/fp8_tune.py).

    python benchmarks/sass_count.py                    # the variants below, a table
    python benchmarks/sass_count.py --dump fp8 --ttgir # one variant's TTGIR (or --sass)

Run it with the Triton of the GPU machine for fidelity (the compiler decides the count).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `minivllm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivllm.kernels import triton_attention as kernel

HQ, HKV, D, BLOCK = 32, 8, 128, 16  # the attn_bench shape

# name: (KV cache dtype, config as paged_attention's `config` argument). The fp8 entries with
# "default" take what the kernel would launch; the others force one change at a time.
VARIANTS = {
    "bf16": ("bf16", {}),
    "bf16 int64": ("bf16", dict(INT64_OFFSETS=True)),
    "fp8": ("fp8", {}),
    "fp8 int64": ("fp8", dict(INT64_OFFSETS=True)),
    "fp8 u32": ("fp8", dict(U32_OFFSETS=True)),
    "bf16 u32": ("bf16", dict(U32_OFFSETS=True)),
    "fp8 tokens": ("fp8", dict(PAGE_LOADS=False, FOLD_SCALE=False)),
    "fp8 pages": ("fp8", dict(PAGE_LOADS=True, FOLD_SCALE=True)),
    "fp8 pages int64": ("fp8", dict(PAGE_LOADS=True, FOLD_SCALE=True, INT64_OFFSETS=True)),
    "fp8 pages N128": ("fp8", dict(PAGE_LOADS=True, FOLD_SCALE=True, BLOCK_N=128)),
    "fp8 pages N128 4w": ("fp8", dict(PAGE_LOADS=True, FOLD_SCALE=True, BLOCK_N=128,
                                      num_warps=4)),
    "fp8 pages N256 4w": ("fp8", dict(PAGE_LOADS=True, FOLD_SCALE=True, BLOCK_N=256,
                                      num_warps=4)),
    "fp8 M64 4w": ("fp8", dict(BLOCK_M=64, num_warps=4)),
    "fp8 M64 N128 4w": ("fp8", dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)),
    "bf16 M64 4w": ("bf16", dict(BLOCK_M=64, num_warps=4)),
}


def decode_launch(kv: str, config: dict, split_kv: bool = False) -> tuple[dict, dict]:
    """(constexprs, launch options) of a decode launch on the attn_bench cache, as
    `paged_attention` computes them (its _launch_config and _prefill_path), `config` applied."""
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
    group = HQ // HKV
    config = dict(config)
    block_m = config.pop("BLOCK_M", None) or kernel._block_m(True, group, D)
    cfg = kernel._launch_config(True, block_m, D, torch.bfloat16, torch.device("cuda"),
                                split_kv=split_kv, kv_dtype=kv_dtype)
    cfg.update(config)
    del cfg["BLOCK_M"]
    page_loads, fold_scale = kernel._prefill_path(cfg, True, BLOCK, kv_fp8=kv == "fp8")
    fp8 = kv == "fp8"
    consts = dict(
        NUM_Q_HEADS=HQ, GROUP=group, HEAD_DIM=D, DIM_PAD=D, BLOCK_SIZE=BLOCK, BLOCK_M=block_m,
        BLOCK_Q=1, BLOCK_N=cfg.pop("BLOCK_N"), SPLIT_KV=split_kv, DECODE_ONLY=True, CAUSAL=True,
        DOT_PRECISION="tf32", INT64_OFFSETS=bool(cfg.pop("INT64_OFFSETS", False)),
        U32_OFFSETS=bool(cfg.pop("U32_OFFSETS", False)),
        NUM_KV_HEADS=HKV, KV_FP8=fp8, DOT_FP16=bool(cfg.pop("DOT_FP16", fp8)),
        PAGE_LOADS=page_loads, FOLD_SCALE=fold_scale, ROW_ALIGN=16 if page_loads else 1)
    consts["PAGES"] = max(1, consts["BLOCK_N"] // BLOCK) if page_loads else 1
    consts.update({k: cfg.pop(k) for k in list(cfg) if k.isupper()})  # any other switch
    return consts, cfg


def compile_paged_attention(consts: dict, pointers: dict, ints: dict, options: dict,
                            arch: int = 90):
    """`_paged_attention_kernel` compiled ahead of time for sm_<arch> by the installed Triton,
    its arguments specialized as a launch would specialize them: `consts` are the constexprs,
    `pointers` the pointer types (16-byte aligned unless the kernel exempts them), `ints` the
    values of the int arguments (marked equal to 1 or divisible by 16, except those the kernel
    lists in do_not_specialize). `consts` gains the ints that became constexprs (equal to 1)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel._paged_attention_kernel
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            if not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif not param.do_not_specialize and ints.get(name) == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if not param.do_not_specialize and ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    names = [p.name for p in fn.params]
    src = ASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_decode(kv: str, config: dict, split_kv: bool = False, arch: int = 90):
    """The decode variant for `kv` ("bf16" or "fp8") and `config`, compiled for sm_<arch> by
    the installed Triton. Arguments are specialized as a launch on the attn_bench cache would:
    data pointers 16-byte aligned, ints divisible by 16 or equal to 1 marked so, except those
    the kernel lists in do_not_specialize."""
    consts, options = decode_launch(kv, config, split_kv)
    fp8 = kv == "fp8"
    kv_type = "*fp8e4nv" if fp8 else "*bf16"
    pointers = dict(query_ptr="*bf16", k_cache_ptr=kv_type, v_cache_ptr=kv_type, out_ptr="*bf16",
                    block_tables_ptr="*i32", seq_lens_ptr="*i32", cu_seqlens_q_ptr="*i32",
                    partial_acc_ptr="*fp32" if split_kv else "*bf16",
                    partial_m_ptr="*fp32" if split_kv else "*bf16",
                    partial_l_ptr="*fp32" if split_kv else "*bf16",
                    k_scale_ptr="*fp32" if fp8 else "*bf16",
                    v_scale_ptr="*fp32" if fp8 else "*bf16")
    ints = dict(stride_qt=HQ * D, stride_qh=D, stride_ot=HQ * D, stride_oh=D,
                stride_cb=BLOCK * HKV * D, stride_ct=HKV * D, stride_ch=D,
                # fp8.empty_scales: head-major [num_blocks, block_size, Hkv]
                stride_sb=BLOCK * HKV if fp8 else 0, stride_st=1 if fp8 else 0,
                stride_sh=BLOCK if fp8 else 0)
    compiled = compile_paged_attention(consts, pointers, ints, options, arch)
    return compiled, consts, options


def disassemble(compiled) -> tuple[str, str]:
    """(machine code, resource usage) of a compiled kernel, from the nvdisasm and cuobjdump that
    ship with Triton (OSError if this Triton has none)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"sass_count_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    return sass, usage


def sass_of(compiled) -> tuple[str, int]:
    """The kernel's machine code and its registers per thread."""
    sass, usage = disassemble(compiled)
    return sass, int(re.search(r"REG:(\d+)", usage).group(1))


def loops(sass: str) -> list[list[str]]:
    """The instructions of each loop (a backward branch back to its label), in program order;
    only loops of more than 50 instructions: the tile loops, not the search over sequences."""
    labels, lines = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(lines)
        elif re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line):
            lines.append(re.sub(r"\s*/\*[0-9a-f]+\*/\s*", "", line, count=1).strip())
    found = []
    for end, line in enumerate(lines):
        target = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), end + 1) <= end:
            found.append(lines[labels[target.group(1)]:end + 1])
    return [body for body in found if len(body) > 50]


def opcode_histogram(body: list[str]) -> dict[str, int]:
    """How many of each opcode (predicates and modifiers dropped: `@P0 IMAD.WIDE` -> IMAD)."""
    counts: dict[str, int] = {}
    for line in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", line).split()[0].split(".")[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def report(name: str, kv: str, config: dict) -> dict:
    compiled, consts, options = compile_decode(kv, config)
    sass, regs = sass_of(compiled)
    body = (loops(sass) or [[]])[0]  # the unmasked (full-tile) loop
    block_n, warps = consts["BLOCK_N"], options["num_warps"]
    tile_bytes = 2 * block_n * D * (1 if kv == "fp8" else 2) + (2 * block_n * 4 if kv == "fp8"
                                                                 else 0)
    ttgir = compiled.asm["ttgir"]
    return dict(
        name=name, kv=kv, BLOCK_N=block_n, num_warps=warps, num_stages=options["num_stages"],
        PAGE_LOADS=consts["PAGE_LOADS"], INT64_OFFSETS=consts["INT64_OFFSETS"],
        loop=len(body), warp_instr_per_kv_byte=len(body) * warps / tile_bytes,
        regs=regs,
        convert_layout=ttgir.count("ttg.convert_layout"), local_load=ttgir.count("local_load"),
        ops=opcode_histogram(body))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--dump", help="print one variant's compiled code instead")
    parser.add_argument("--ttgir", action="store_true")
    parser.add_argument("--ptx", action="store_true")
    parser.add_argument("--ops", action="store_true", help="print each loop's opcode counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_count.py compiles for the GPU: unset TRITON_INTERPRET")
    if args.dump:
        compiled, _, _ = compile_decode(*VARIANTS[args.dump])
        print(compiled.asm["ttgir"] if args.ttgir else compiled.asm["ptx"] if args.ptx
              else "\n".join(loops(sass_of(compiled)[0])[0]))
        return 0
    print(f"triton {triton.__version__}, sm_90, decode, Hq {HQ} / Hkv {HKV} / D {D} / block "
          f"{BLOCK}")
    print(f"{'variant':<20}{'N':>5}{'warps':>6}{'loop':>6}{'warp instr/KV B':>17}{'regs':>6}"
          f"{'cvt_layout':>11}{'local_load':>11}")
    for name in args.variants.split(","):
        r = report(name, *VARIANTS[name])
        print(f"{name:<20}{r['BLOCK_N']:>5}{r['num_warps']:>6}{r['loop']:>6}"
              f"{r['warp_instr_per_kv_byte']:>17.4f}{r['regs']:>6}{r['convert_layout']:>11}"
              f"{r['local_load']:>11}", flush=True)
        if args.ops:
            print("    " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
