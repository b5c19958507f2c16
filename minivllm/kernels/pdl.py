"""Programmatic dependent launch (PDL): let a kernel start while the one before it finishes.

A decode step at batch 1 is a chain of short kernels, each reading what the previous one wrote.
Normally a kernel may not start until its predecessor has completely finished: its last thread
block has exited and its writes have been flushed. Only then are the new kernel's blocks
placed on the SMs, and only then do they start their first loads, which take a full trip to
memory. With a few microseconds of work per kernel, those gaps (launch, ramp up, drain) are a
large part of the step even inside a CUDA graph.

Hopper (compute capability 9.0) lets a kernel opt out of the full wait. Launched with the
*programmatic stream serialization* attribute (Triton: `launch_pdl=True`), its blocks may be
placed as soon as every block of the previous kernel has either signalled
`griddepcontrol.launch_dependents` or exited. The new kernel then runs its *prologue*, work that
does not depend on the previous kernel (index arithmetic, reading step metadata, loading its
weights), and calls `griddepcontrol.wait`, which returns once the previous kernel has finished
and its writes are visible. The prologue overlaps the previous kernel's tail; the launch latency
disappears from the critical path.

The contract every kernel here follows, written once in `wait_and_release`:

* before the wait, a kernel only reads what no kernel of the step writes: weights, the step's
  metadata (written by the host and by ordinary kernels before the forward pass), constant tables;
  it writes nothing;
* it signals its own dependents right after its wait. So when a kernel starts, its predecessor
  has at least passed its own wait, i.e. everything before the predecessor has finished: by
  induction, the only kernel that may still run is the immediate predecessor, which is exactly
  what the wait covers.

Edges form between consecutive kernels of one stream only. A kernel launched *without* the
attribute (a cuBLAS GEMM, a PyTorch elementwise op) waits for its predecessor in full, as always;
a PDL kernel after one of those can start only when that kernel's blocks have all exited (they
never signal early), which still hides the final flush and the launch. So the gain grows with
the runs of consecutive PDL kernels: that is why the decode layers also do their batch-1
GEMMs in Triton (layers/fused_linear.py). The launch attribute is captured into CUDA graphs as a
programmatic edge, so replays keep the overlap.

`MINIVLLM_PDL=0` turns it off, to measure what it brings. Off Hopper, on CPU and under
TRITON_INTERPRET=1 it is off whatever the switch says: the instructions are compiled in only
when `USE_PDL` is true, so they are never seen by an older GPU's assembler or by the
interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_and_release(USE_PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then allow the
    next kernel to start its own prologue. A no-op unless USE_PDL (a launch with `pdl_launch`)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of compute capability 9.0 or
    newer, not the interpreter, unless MINIVLLM_PDL=0."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("MINIVLLM_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def pdl_launch(device: torch.device) -> dict:
    """The launch arguments of a kernel that calls `wait_and_release`: the compile-time switch
    and the matching launch attribute, both on or both off."""
    on = use_pdl(device)
    return {"USE_PDL": on, "launch_pdl": on}
