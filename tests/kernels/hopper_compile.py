"""The attention kernel compiled for Hopper (sm_90) without a GPU, to read what it compiles to.

Triton ships ptxas, nvdisasm and cuobjdump, so a kernel can be compiled ahead of time for a GPU
this machine does not have. `compile_launch` runs `triton_attention.paged_attention` on CPU
tensors with the kernel swapped for a recorder, so the launch is exactly the one the wrapper
would make on a GPU (its `_launch_config` is asked for the GPU's configuration, and programmatic
dependent launch is on, as on Hopper): the recorded constexprs, launch options and argument
values are then compiled the way Triton's launcher specializes them (pointers 16-byte aligned,
ints equal to 1 or divisible by 16 marked so, except the arguments the kernel exempts). A change
to the kernel's switches needs no change here. `record` and `compile_kernel` do the same for any
kernel module (the fused layers' kernels: tests/kernels/test_pdl.py).

Needs a process without TRITON_INTERPRET=1 (under it `@triton.jit` makes an interpreted function
that cannot be compiled): the tests run it in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch
import triton

from minivllm.kernels import fp8, triton_attention

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                 torch.int32: "*i32", torch.int64: "*i64", fp8.FP8_DTYPE: "*fp8e4nv"}


class _Recorder:
    """Stands in for the JIT kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def record(module, kernel: str, call, pdl: bool = True, **swaps) -> tuple[tuple, dict]:
    """(args, kwargs) of the launch of `module.<kernel>` that `call()` makes (CPU tensors), as the
    wrapper makes it on a Hopper GPU: with programmatic dependent launch (`pdl`, the module's
    `pdl_launch` answering as on sm_90), and `swaps` (module attributes) replaced meanwhile."""
    recorder = _Recorder()
    replaced = {kernel: recorder, "pdl_launch": lambda device: {"USE_PDL": pdl, "launch_pdl": pdl},
                **swaps}
    saved = {name: getattr(module, name) for name in replaced}
    for name, value in replaced.items():
        setattr(module, name, value)
    try:
        call()
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    return recorder.args, recorder.kwargs


def record_launch(call, pdl: bool = True,
                  kernel: str = "_paged_attention_kernel") -> tuple[tuple, dict]:
    """(args, kwargs) of the launch of the attention kernel, or with `kernel` =
    "_merge_splits_kernel" of the split-KV merge that follows it, made by `call()` (CPU tensors),
    with the launch configuration the wrapper chooses on a GPU. The other kernel is not run."""
    real_config = triton_attention._launch_config

    def gpu_config(decode_only, block_m, head_dim, dtype, device, *rest, **kwargs):
        return real_config(decode_only, block_m, head_dim, dtype, torch.device("cuda"), *rest, **kwargs)

    other = ({"_paged_attention_kernel", "_merge_splits_kernel"} - {kernel}).pop()
    return record(triton_attention, kernel, call, pdl, _launch_config=gpu_config,
                  **{other: _Recorder()})


def compile_launch(call, arch: int = 90):
    """The kernel of `call()`'s launch, compiled for sm_<arch> by the installed Triton."""
    args, kwargs = record_launch(call, pdl=arch >= 90)
    return compile_kernel(triton_attention._paged_attention_kernel, args, kwargs, arch)


def compile_kernel(fn, args: tuple, kwargs: dict, arch: int = 90):
    """`fn` compiled for sm_<arch> with the arguments of a recorded launch, specialized as the
    launcher would specialize them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs[param.name]
        if param.is_constexpr:
            signature[param.name], consts[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            if not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[param.name], consts[(i,)] = "constexpr", 1
        else:
            signature[param.name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, consts, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def attention_call(query_len: int, context: int, batch: int = 2, kv: str = "bf16", config=None,
                   num_splits: int = 1, heads=(32, 8, 128), block_size: int = 16):
    """A `paged_attention` call on the attn_bench shape (Llama-3-8B-like heads, block 16), CPU
    tensors: query_len 1 is decode, query_len == context a causal prefill, else chunked."""
    hq, hkv, d = heads
    blocks = batch * -(-context // block_size)
    dtype = torch.bfloat16
    k = torch.zeros(blocks, block_size, hkv, d, dtype=fp8.FP8_DTYPE if kv == "fp8" else dtype)
    scales = dict(zip(("k_scale", "v_scale"), fp8.empty_scales(k))) if kv == "fp8" else {}
    query = torch.zeros(batch * query_len, hq, d, dtype=dtype)
    tables = torch.arange(blocks, dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    cu = torch.arange(batch + 1, dtype=torch.int32) * query_len
    return lambda: triton_attention.paged_attention(
        query, k, torch.zeros_like(k), tables, seq_lens, cu, d ** -0.5, True, torch.empty_like(query),
        max_seq_len=context, num_splits=num_splits, config=dict(config or {}), **scales)


def disassemble(compiled) -> tuple[str, str]:
    """(machine code, resource usage) from the nvdisasm and cuobjdump shipped with Triton
    (OSError where this Triton has none)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"hopper_compile_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    return sass, usage


def loops(sass: str) -> list[list[str]]:
    """The instructions of each loop (a backward branch to its label), in program order; only
    loops of more than 50 instructions: the tile loops, not the search over sequences."""
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


def static_report(compiled) -> dict:
    """What the compiled kernel does: K/V copies of 16 bytes through cp.async (pipelined,
    vectorized loads), wgmma instructions, narrow (1-2 byte) global loads, registers, spill
    bytes, shared memory, and the machine instructions of each tile loop (unmasked tiles first),
    plus how many of those load shared memory one byte at a time (`LDS.U8`)."""
    ptx = compiled.asm["ptx"]
    report = dict(
        cp_async_16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*\], 0x10\b", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        narrow_loads=len(re.findall(r"ld\.global(\.[a-z0-9:_]+)*\.(b8|b16|u8|u16)\b", ptx)),
        shared_kb=round(compiled.metadata.shared / 1024, 1), num_warps=compiled.metadata.num_warps)
    try:
        sass, usage = disassemble(compiled)
    except (OSError, subprocess.CalledProcessError):  # no CUDA binary tools in this Triton
        sass = usage = ""
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found:
        report.update(regs=int(found.group(1)), spill_bytes=int(found.group(2)) + int(found.group(3)))
    bodies = loops(sass)
    report["loop_instructions"] = [len(body) for body in bodies]
    report["loop_byte_loads"] = [sum("LDS.U8" in i for i in body) for body in bodies]
    return report
