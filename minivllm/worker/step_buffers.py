"""StepBuffers: a flat int32 buffer on the host (filled by numpy) and its twin on the device.

Sending a step's metadata as seven small tensors would cost seven transfers, each a few
microseconds of launch latency (and a blocking staging copy if the host memory is pageable).
Instead every field is a slice of ONE buffer, written on the host and sent with ONE asynchronous
copy. Pinned (page-locked) host memory is what lets that copy run by DMA without blocking.

The host side is double-buffered: while the GPU may still be copying from the buffer of step n,
the host already writes step n+1 into the other one. Before a host buffer is written again,
`host()` waits on the event recorded after *its* last copy, normally long done.

The device side is single: a copy into it is queued on the same stream as the kernels that read
it, so it cannot start before the previous step's kernels have finished with it.
On CPU there is one buffer and `upload` does nothing.
"""

from __future__ import annotations

import numpy as np
import torch


class StepBuffers:
    def __init__(self, size: int, device: torch.device, growable: bool = True):
        self._device = device
        self.on_cuda = device.type == "cuda"
        self.growable = growable
        self._turn = 0
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        size = max(size, 1)
        copies = 2 if self.on_cuda else 1
        self._hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=self.on_cuda) for _ in range(copies)]
        self._arrays = [host.numpy() for host in self._hosts]  # the same memory; made once, not per step
        self._events = [torch.cuda.Event() if self.on_cuda else None for _ in range(copies)]
        self.device_tensor = (torch.zeros(size, dtype=torch.int32, device=self._device) if self.on_cuda
                              else self._hosts[0])
        self._slices: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # size -> (device, hosts)

    @property
    def size(self) -> int:
        return self._hosts[0].shape[0]

    @property
    def host_tensor(self) -> torch.Tensor:
        """The host buffer of the current turn (the one `host()` last returned)."""
        return self._hosts[self._turn]

    def host(self, size: int) -> np.ndarray:
        """The next host buffer as numpy, at least `size` long, safe to overwrite now."""
        if size > self.size:
            if not self.growable:
                raise ValueError(f"a step needs {size} buffer elements but this buffer has {self.size}")
            if self.on_cuda:
                torch.cuda.current_stream(self._device).synchronize()  # nothing may still read the old ones
            self._allocate(max(size, 2 * self.size))
        self._turn = (self._turn + 1) % len(self._hosts)
        if self._events[self._turn] is not None:
            self._events[self._turn].synchronize()
        return self._arrays[self._turn]

    def upload(self, size: int) -> None:
        """Send the first `size` elements of the current host buffer to the device: one copy."""
        if not self.on_cuda:
            return
        device, hosts = self._sliced(size)
        device.copy_(hosts[self._turn], non_blocking=True)
        self._events[self._turn].record()

    def _sliced(self, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The first `size` elements of the device buffer and of each host one, sliced once per
        size: a graph's step always sends the same size, and a slice is an eager op."""
        sliced = self._slices.get(size)
        if sliced is None:
            if len(self._slices) >= 1024:  # eager steps come in many sizes
                self._slices.clear()
            sliced = self._slices[size] = (self.device_tensor[:size], [host[:size] for host in self._hosts])
        return sliced
