"""The fused sum + residual add + RMSNorm through peer memory (peer_add_rms_norm.py), its flag
protocol included, run by the Triton interpreter: each rank is a process, and what symmetric memory
would map into every GPU is CPU memory shared between them (each process builds its own table of
the addresses, as each GPU has its own mapping). On two GPUs the engine runs it in
tests/distributed/test_tp_gpu.py."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from minivllm.distributed.peer_add_rms_norm import peer_add_rms_norm
from minivllm.layers.fused_ops import rms_norm

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs in the Triton interpreter")

ROOT = Path(__file__).resolve().parents[2]
CALLS = 3  # one after the other, through the same buffers and flags


def _inputs(world: int, rows: int, n: int, dtype: torch.dtype) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Per call, every rank's partial x; one residual stream (the same on every rank, as in the model)."""
    g = torch.Generator().manual_seed(0)
    xs = [[torch.randn(rows, n, generator=g).to(dtype) for _ in range(world)] for _ in range(CALLS)]
    return xs, torch.randn(rows, n, generator=g).to(dtype)


def _rank(rank: int, world: int, buffers, flags, xs, residual, weight, eps, max_programs, results) -> None:
    # This process's addresses of every rank's buffer and flags: the symmetric-memory table.
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    flag_ptrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    residual = residual.clone()
    outs = []
    for call in xs:
        outs.append(peer_add_rms_norm(call[rank], residual, weight, eps, buffer_ptrs, flag_ptrs, rank,
                                      max_programs=max_programs))
    # As numbers, not tensors: a tensor put on a queue is sent as shared memory, gone with this process.
    results.put((rank, [o.float().tolist() for o in outs], residual.float().tolist()))


def _reference(xs, residual, weight, eps) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The unfused path: the sum (in float32, in rank order, rounded once), then the fused add +
    RMSNorm kernel that follows the all-reduce without this fusion."""
    residual, outs = residual.clone(), []
    for call in xs:
        total = torch.stack([x.float() for x in call]).sum(0).to(residual.dtype)
        outs.append(rms_norm(total, weight, eps, residual))
    return outs, residual


@interpreted
@pytest.mark.parametrize(("world", "rows", "n", "max_programs", "dtype"), [
    (2, 5, 48, 2, torch.float32),  # a program does several rows: its slots serve every one
    (2, 3, 64, 8, torch.bfloat16),
    (4, 2, 32, 2, torch.float32),
])
def test_every_rank_gets_the_same_bits_those_of_the_unfused_path_and_the_flags_end_at_zero(world, rows, n, max_programs,
                                                                                   dtype):
    eps = 1e-6
    xs, residual = _inputs(world, rows, n, dtype)
    weight = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5
    buffers = [torch.full((rows * n,), float("nan"), dtype=dtype).share_memory_() for _ in range(world)]
    flags = [torch.zeros(max_programs * world, dtype=torch.int32).share_memory_() for _ in range(world)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, buffers, flags, xs, residual, weight, eps, max_programs,
                                             results)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 300  # a barrier that never opens spins forever: bound it
    while len(got) < world:  # a rank that fails leaves the others waiting at a barrier: stop them
        try:
            rank, outs, res = results.get(timeout=1)
            got[rank] = ([torch.tensor(o).to(dtype) for o in outs], torch.tensor(res).to(dtype))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                pytest.fail(f"a rank exited with {failed}" if failed else "the ranks still wait after 300 s")
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in range(1, world):  # every rank the same bits: each samples from its own copy
        assert all(torch.equal(a, b) for a, b in zip(got[rank][0], got[0][0])) and torch.equal(got[rank][1], got[0][1])
    # Against the unfused path: the same bits in float32. In bf16 the interpreter rounds float32
    # to bf16 its own way, not as torch does (a GPU does as torch does): a bf16 step apart, of
    # values under 8 here (a rank's partial left out would be off by about 1).
    want_outs, want_residual = _reference(xs, residual, weight, eps)
    exact = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-5}
    outs, res = got[0]
    torch.testing.assert_close(res, want_residual, **exact)
    for out, want in zip(outs, want_outs):
        torch.testing.assert_close(out, want, **exact)
    assert all(int(f.abs().sum()) == 0 for f in flags), [f.tolist() for f in flags]


class _Peer:
    """Stands in for PeerAllReduce, as if two ranks held the same partial: the sum is 2 x."""

    def __init__(self, fits_norm: bool):
        self.fused = fits_norm
        self.calls: list[str] = []

    def fits(self, x):
        return True

    def __call__(self, x):
        self.calls.append("sum")
        return 2 * x

    def fits_norm(self, x, residual):
        return self.fused

    def add_rms_norm(self, x, residual, weight, eps):
        self.calls.append("sum + add + norm")
        residual += 2 * x
        return weight * F.rms_norm(residual.float(), weight.shape, eps=eps).to(residual.dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_the_seam_after_a_row_parallel_layer_takes_one_kernel_where_the_peer_can(fused):
    from minivllm.distributed import TensorParallel
    from minivllm.layers.layernorm import RMSNorm, reduce_add_rms_norm

    peer = _Peer(fused)
    tp = TensorParallel(rank=0, size=2, peer=peer)
    norm = RMSNorm(32)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    want_residual = residual + 2 * x
    out, res = reduce_add_rms_norm(x, residual.clone(), norm, tp)
    assert peer.calls == (["sum + add + norm"] if fused else ["sum"])
    torch.testing.assert_close(res, want_residual)
    torch.testing.assert_close(out, norm(want_residual))


def test_the_fused_seam_is_taken_only_for_what_its_kernel_handles(monkeypatch):
    from minivllm.distributed.peer_all_reduce import MAX_NORM_WIDTH, PeerAllReduce

    peer = object.__new__(PeerAllReduce)  # its checks only: no GPU, no symmetric memory here
    peer.dtype, peer.max_numel, peer.world_size = torch.bfloat16, 4096, 2
    x = torch.zeros(4, 1024, dtype=torch.bfloat16)
    assert peer.fits_norm(x, torch.zeros_like(x))
    assert not peer.fits_norm(x, torch.zeros(4, 1024))  # the residual in another dtype
    assert not peer.fits_norm(x, torch.zeros(8, 1024, dtype=torch.bfloat16)[::2])  # not contiguous
    assert not peer.fits_norm(torch.zeros(8, 1024, dtype=torch.bfloat16), torch.zeros(8, 1024, dtype=torch.bfloat16))
    peer.max_numel = 2 * MAX_NORM_WIDTH
    wide = torch.zeros(1, 2 * MAX_NORM_WIDTH, dtype=torch.bfloat16)
    assert not peer.fits_norm(wide, torch.zeros_like(wide))  # a row wider than one program holds
    peer.world_size = 3
    assert not peer.fits_norm(x, torch.zeros_like(x))  # the kernel's vector of ranks: a power of two
    peer.world_size = 2
    monkeypatch.setenv("MINIVLLM_PEER_ADD_NORM", "0")
    assert not peer.fits_norm(x, torch.zeros_like(x))


def compiled_for_hopper() -> dict[str, str]:
    """The kernel of an 8B-shaped seam (64 rows x 4096, bf16, two ranks) compiled for sm_90 as its
    launcher specializes it: PTX and resource usage (run by the test below, without the interpreter)."""
    from minivllm.distributed import peer_add_rms_norm as module
    from tests.kernels.hopper_compile import _Recorder, compile_kernel, disassemble

    kernel, recorder = module._peer_add_rms_norm_kernel, _Recorder()
    module._peer_add_rms_norm_kernel = recorder
    try:
        x = torch.zeros(64, 4096, dtype=torch.bfloat16)
        ptrs = torch.zeros(2, dtype=torch.int64)
        module.peer_add_rms_norm(x, x.clone(), x[0].clone(), 1e-6, ptrs, ptrs.clone(), 0)
    finally:
        module._peer_add_rms_norm_kernel = kernel
    compiled = compile_kernel(kernel, recorder.args, recorder.kwargs)
    return {"ptx": compiled.asm["ptx"], "usage": disassemble(compiled)[1]}


def test_on_hopper_the_flags_are_system_scope_and_the_peer_rows_load_in_vectors():
    """What the interpreter cannot show: the barrier's compare-and-swaps are release/acquire at
    system scope (seen by the other GPUs), the ranks' rows load 16 bytes at a time past the L1,
    and nothing spills."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = ("import json; from tests.distributed.test_peer_add_rms_norm import compiled_for_hopper; "
              "print(json.dumps(compiled_for_hopper()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    ptx = compiled["ptx"]
    assert "atom.global.release.sys.cas.b32" in ptx and "atom.global.acquire.sys.cas.b32" in ptx
    assert "ld.global.cg.v4.b32" in ptx
    assert "STACK:0" in compiled["usage"], compiled["usage"]
