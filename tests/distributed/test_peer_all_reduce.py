"""The one-shot all-reduce's choice of copying the rank's tensor in inside its kernel (the sum
itself runs on two GPUs only: tests/distributed/test_tp_gpu.py)."""

import torch

from minivllm.distributed import peer_all_reduce


def test_the_copy_moves_into_the_kernel_for_aligned_tensors_unless_switched_off(monkeypatch):
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        assert not peer_all_reduce._copy_in_kernel(torch.zeros(8))
        return
    x = torch.zeros(64, dtype=torch.bfloat16)
    assert peer_all_reduce._copy_in_kernel(x)
    assert not peer_all_reduce._copy_in_kernel(x[1:9])  # 2 bytes off the buffer's alignment
    assert not peer_all_reduce._copy_in_kernel(x[:7])  # 14 bytes
    monkeypatch.setenv("MINIVLLM_PEER_COPY_IN_KERNEL", "0")
    assert not peer_all_reduce._copy_in_kernel(x)
