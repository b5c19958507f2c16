"""Tensor parallelism's plumbing: which rank this process is, and the collectives between ranks.

    from minivllm.distributed import SINGLE, TensorParallel, all_reduce, all_gather

`parallel_state.py` holds the state (`TensorParallel`: rank, size, groups; init and destroy),
`communication.py` the few collectives the layers need. It sits below `layers/` and imports
nothing else of minivllm. With one process (`SINGLE`) nothing is initialized and every op is
the identity. The design is in docs/tensor_parallel.md.
"""

from minivllm.distributed.communication import (
    all_gather,
    all_reduce,
    barrier,
    min_over_ranks,
)
from minivllm.distributed.parallel_state import (
    SINGLE,
    TIMEOUT,
    Shard,
    TensorParallel,
    destroy_tensor_parallel,
    init_tensor_parallel,
)

__all__ = [
    "SINGLE",
    "TIMEOUT",
    "Shard",
    "TensorParallel",
    "all_gather",
    "all_reduce",
    "barrier",
    "destroy_tensor_parallel",
    "init_tensor_parallel",
    "min_over_ranks",
]
