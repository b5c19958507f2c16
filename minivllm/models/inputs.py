"""Checks shared by every model's `forward` on the engine's packed inputs."""

from __future__ import annotations

import torch


def check_token_inputs(input_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """input_ids and positions must both be [T]: one entry per token of the packed batch.

    Shapes only: reading the values would force a GPU->CPU sync and break CUDA-graph capture.
    """
    if input_ids.dim() != 1 or positions.dim() != 1:
        raise ValueError(
            "input_ids and positions must be 1-D [T] (tokens packed over the batch), got shapes "
            f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
        )
    if input_ids.shape != positions.shape:
        raise ValueError(
            f"input_ids has {input_ids.shape[0]} tokens but positions has {positions.shape[0]}"
        )
