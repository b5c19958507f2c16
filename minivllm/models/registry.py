"""Which class implements a checkpoint: looked up by `config.json`'s `architectures[0]`.

Hugging Face writes the name of the class that saved the weights there (`"Qwen3ForCausalLM"`), so
it identifies both the computation and the tensor names. Adding an architecture means writing its
module and one line here.
"""

from __future__ import annotations

from torch import nn

from minivllm.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from minivllm.models.opt import OPTForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MODEL_CLASSES))


def model_class_for(config) -> type[nn.Module]:
    """The minivllm class for a Hugging Face config, or a ValueError naming the supported ones."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(
            "config.json has no 'architectures' entry, so the model class is unknown; supported "
            f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    name = architectures[0]
    if name not in _MODEL_CLASSES:
        raise ValueError(
            f"architecture {name!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _MODEL_CLASSES[name]
