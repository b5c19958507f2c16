"""Load a Hugging Face model directory: config.json + *.safetensors -> a minivllm model.

    model = load_model("path/to/Qwen3-0.6B", dtype=torch.bfloat16, device="cuda")

Steps: read the config with `transformers.AutoConfig` (local files only, never the hub), pick the
class from the registry, build it directly on the target device in the target dtype, then stream
the checkpoint tensors into its parameters one at a time (so peak memory is the model plus one
tensor, not two copies of the model).

Under tensor parallelism (`tp`, one rank of N) the model is built with this rank's shard of each
layer, and every checkpoint tensor is read only as far as this rank needs it: the layer says
which slice (`checkpoint_split`: a dimension and a range), and safetensors reads that slice from
the file (`get_slice`), so no rank ever holds the whole model.

Every way a directory can be broken (no config.json, config.json that is not a JSON object, a
truncated or corrupt safetensors file, a missing tensor) raises an OSError or ValueError that
names the file and what is wrong with it.

Names: our parameters carry the checkpoint's names, except for fused projections (q|k|v,
gate|up; see `layers/linear.py`), which a model declares in `packed_modules_mapping`. A checkpoint
tensor we have no use for (say `rotary_emb.inv_freq`, which we recompute, or `lm_head.weight` of
a tied model) is skipped on purpose; a parameter the checkpoint does not fill is an error, never
left at its random initial value.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from minivllm.config import read_config_json
from minivllm.distributed import SINGLE, TensorParallel
from minivllm.layers.linear import CheckpointSplit, MergedColumnParallelLinear
from minivllm.models.registry import model_class_for

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def load_model(model_dir, dtype: torch.dtype = torch.float32, device="cpu",
               tp: TensorParallel = SINGLE) -> nn.Module:
    """Build the model described by `model_dir/config.json` and fill it from its safetensors
    (this rank's shard of it, under tensor parallelism)."""
    model_dir = Path(model_dir)
    dtype = _as_float_dtype(dtype)
    config = load_config(model_dir)
    try:
        model_class = model_class_for(config)
    except ValueError as err:
        raise ValueError(f"{model_dir / 'config.json'}: {err}") from None
    files = checkpoint_files(model_dir)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config, tp)
    names = ", ".join(f.name for f in files)
    load_weights(model, read_safetensors(files), source=f"{names} in {model_dir}")
    return model.eval().requires_grad_(False)


def load_config(model_dir):
    """The directory's config.json, parsed by transformers (which knows every model's defaults).

    Our own reading comes first, so a missing or malformed file gets our error; whatever
    transformers then refuses (no model_type, a field of the wrong type) is a ValueError that
    names the file, with transformers' reason.
    """
    from transformers import AutoConfig

    read_config_json(model_dir)
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # its errors vary by version: ValueError, OSError, its own classes
        raise ValueError(f"{Path(model_dir) / 'config.json'} is not a usable model config: {err}") from err


def checkpoint_files(model_dir) -> list[Path]:
    """The safetensors files holding the weights, in a fixed order.

    One `model.safetensors`, or the shards named by `model.safetensors.index.json` (what
    `save_pretrained` writes above its `max_shard_size`), or failing both any `*.safetensors`.
    """
    model_dir = Path(model_dir)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    index_path = model_dir / SHARD_INDEX
    if index_path.is_file():
        return _shards_from_index(index_path)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    hint = ""
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        hint = " (it has PyTorch .bin/.pt weights; re-save them with save_pretrained, which writes safetensors)"
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{index_path} is not a valid safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard.name} listed in {index_path} does not exist")
    return shards


class CheckpointTensor:
    """A tensor of an open safetensors file, not read yet: its shape, and `read` for all of it or
    one slice (which reads only that slice's bytes)."""

    def __init__(self, handle, name: str, path: Path):
        self._handle, self.name, self.path = handle, name, path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(self.name).get_shape())

    def read(self, split: CheckpointSplit = None) -> torch.Tensor:
        """The whole tensor, or with split = (dim, Shard) the range [start, start + size) of dim."""
        try:
            if split is None or split[1].size == split[1].full:  # all of it (one rank): one read
                return self._handle.get_tensor(self.name)
            dim, part = split
            index = (slice(None),) * dim + (slice(part.start, part.start + part.size),)
            return self._handle.get_slice(self.name)[index]
        except SafetensorError as err:
            raise ValueError(f"tensor {self.name!r} in {self.path} cannot be read: {err}") from None


def read_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, CheckpointTensor, str]]:
    """Yield (name, tensor, file) for every tensor of every file; nothing is read until the
    loader calls `tensor.read`, one tensor (or one rank's slice of it) in memory at a time.

    safetensors checks a file's header against its size when it opens it, so a truncated or
    corrupt file fails here, before any tensor is copied.
    """
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {err}") from None
        with handle as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, CheckpointTensor(f, name, path), path.name


def load_weights(
    model: nn.Module, tensors: Iterable[tuple[str, CheckpointTensor, str]], source: str = "checkpoint"
) -> None:
    """Copy checkpoint tensors into `model`; every parameter (and every fused shard) must be filled.

    A split layer gets only its slice of each tensor; the shape check compares the checkpoint's
    full shape with the full shape the layer is a slice of. Conversion to the model's dtype and
    device happens in the copy.
    """
    params = dict(model.named_parameters())  # a tied lm_head appears once, under the embedding
    packed = getattr(model, "packed_modules_mapping", {})
    expected = _expected_targets(model, params, packed)
    loaded: set[tuple[str, str | None]] = set()
    for name, tensor, file in tensors:
        target = _resolve(name, params, packed)
        if target is None:
            continue  # not ours to load (see the module docstring)
        destination, split = _destination(model, params, target)
        full_shape = _full_shape(destination, split)
        if tensor.shape != full_shape:
            raise ValueError(
                f"tensor {name!r} in {file} has shape {tensor.shape} but the model built "
                f"from config.json expects {full_shape}"
            )
        destination.copy_(tensor.read(split))
        loaded.add(target)
    missing = [expected[t] for t in expected if t not in loaded]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"the weights in {source} lack {len(missing)} tensor(s) the model built from "
            f"config.json needs: {shown}{more}"
        )


# A target is (parameter name, shard name or None for an unfused parameter).
Target = tuple[str, str | None]


def _resolve(name: str, params: dict, packed: dict) -> Target | None:
    """Which parameter (and shard) a checkpoint tensor fills, or None if the model has no use for it.

    Also accepts names without the leading "model." (checkpoints saved from the bare decoder,
    like the original OPT ones: "decoder.layers.0...").
    """
    for candidate in (name, "model." + name):
        if candidate in params:
            return candidate, None
        module_path, _, kind = candidate.rpartition(".")  # "....self_attn.q_proj", "weight"
        parent, _, module = module_path.rpartition(".")
        if module in packed:
            fused, shard = packed[module]
            fused_name = f"{parent}.{fused}.{kind}" if parent else f"{fused}.{kind}"
            if fused_name in params:
                return fused_name, shard
    return None


def _expected_targets(model: nn.Module, params: dict, packed: dict) -> dict[Target, str]:
    """Every target the checkpoint must fill, mapped to its checkpoint name (for error messages)."""
    unpacked = {value: key for key, value in packed.items()}  # (fused, shard) -> checkpoint module
    expected: dict[Target, str] = {}
    for name in params:
        module_path, _, kind = name.rpartition(".")
        module = model.get_submodule(module_path)
        if isinstance(module, MergedColumnParallelLinear):
            prefix, _, fused = module_path.rpartition(".")
            for shard in module.shard_sizes:
                original = unpacked.get((fused, shard), f"{fused}[{shard}]")
                expected[(name, shard)] = f"{prefix}.{original}.{kind}".lstrip(".")
        else:
            expected[(name, None)] = name
    return expected


def _destination(model: nn.Module, params: dict, target: Target) -> tuple[torch.Tensor, CheckpointSplit]:
    """Where a checkpoint tensor goes (the parameter, or its rows of a fused one), and which
    slice of the tensor this rank keeps (None: all of it)."""
    name, shard = target
    module_path, _, kind = name.rpartition(".")
    module = model.get_submodule(module_path)
    data = params[name].data
    if shard is not None:
        data = module.shard(data, shard)
    split = module.checkpoint_split(kind, shard) if hasattr(module, "checkpoint_split") else None
    if split is not None:  # a vocabulary block's padding rows are not in the checkpoint
        dim, part = split
        data = data.narrow(dim, 0, part.size)
    return data, split


def _full_shape(destination: torch.Tensor, split: CheckpointSplit) -> tuple[int, ...]:
    """The checkpoint shape a destination is (a slice of)."""
    shape = list(destination.shape)
    if split is not None:
        dim, part = split
        shape[dim] = part.full
    return tuple(shape)


def _as_float_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16"); only floating-point types make sense."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no float32 copy first), then restore the default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
