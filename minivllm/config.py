"""Engine configuration: what to run (model), where to keep K/V (cache), how to batch (scheduler).

Three small dataclasses, each validated when it is built, so a bad value fails at once with an
error that names the field, never deep inside a forward pass. `EngineConfig` bundles them and
fills in what can only be known from the model directory (the context length of the model).

    EngineConfig.from_dict({"model": "path/to/dir", "block_size": 16, "max_num_seqs": 32})
    EngineConfig.from_dict({"model": {"model": "dir"}, "cache": {"block_size": 8}})
    EngineConfig.from_dict({"model": "dir", "speculative_config": {"method": "ngram",
                                                                   "num_speculative_tokens": 4}})
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minivllm.distributed.peer_all_reduce import ALL_REDUCE_CHOICES
from minivllm.kernels import BACKENDS as ATTENTION_BACKENDS
from minivllm.kernels import KVCacheSpec
from minivllm.kernels.fp8 import FP8_DTYPE

MiB = 1 << 20

KV_CACHE_DTYPES = ("auto", "fp8")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
# Keys under which Hugging Face configs store the longest context the model was trained for.
_CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
# torch.manual_seed takes a 64-bit seed.
SEED_LIMIT = 2**64
SPECULATIVE_METHODS = ("ngram", "draft")
# Above this many running sequences a step does not speculate (SpeculativeConfig): the largest
# batch up to which n-gram speculation paid, measured by `benchmarks/spec_bench.py --part e2e` on
# the real model (H100, k = 3: 1.14x at 16, 0.96x at 32, 0.92x at 64;
# benchmarks/results/spec_e2e_k3_smollm2-135m-instruct_h100.json).
DISABLE_BY_BATCH_SIZE = 16


def read_config_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A model directory's config.json as a dict; every way it can be wrong is named.

    FileNotFoundError when the directory or its config.json is missing (then it is not a model
    directory at all), ValueError when config.json is not valid JSON or not a JSON object.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "is not a directory" if model_dir.exists() else "does not exist"
        raise FileNotFoundError(f"model directory {str(model_dir)!r} {what}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json, so it is not a Hugging Face model directory"
        )
    try:
        config = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: it is not UTF-8 text ({err.reason})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} must hold a JSON object ({{...}}) of model settings, got a JSON "
            f"{type(config).__name__}"
        )
    return config


def context_length(model_dir: str | os.PathLike) -> int | None:
    """The trained context length from the directory's config.json, if it states one.

    A key that is there with a value that is no length (a string, 0, true) is an error that
    names the file and the key, rather than a length silently ignored.
    """
    hf_config = read_config_json(model_dir)
    # Multimodal configs nest the language model's settings; look there too.
    text_config = hf_config.get("text_config")
    for cfg in (hf_config, text_config if isinstance(text_config, dict) else {}):
        for key in _CONTEXT_LENGTH_KEYS:
            if key not in cfg or cfg[key] is None:
                continue
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                where = "text_config." if cfg is text_config else ""
                raise ValueError(
                    f"{Path(model_dir) / 'config.json'}: {where}{key} must be an integer "
                    f"context length >= 2, got {value!r}"
                )
            return value
    return None


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class ModelConfig:
    """Which model to load and how.

    model: a Hugging Face model directory (config.json + *.safetensors [+ tokenizer]).
    dtype: "auto" means float32 on CPU (fast and exact there) and bfloat16 on CUDA.
    device: "auto" means CUDA when available, else CPU.
    seed: seeds the global RNG used by requests that bring no seed of their own (0 <= seed < 2**64).
    attention_backend: the `minivllm.kernels` backend ("auto" picks the fastest that can run).
        "triton" needs a GPU (or TRITON_INTERPRET=1 on CPU, for testing), "cuda" a GPU and the
        built extension of csrc/.

    Checked here, before any weight is read: the directory holds a readable config.json, and the
    device and attention backend can run on this machine.
    enforce_eager: never use CUDA graphs; every step launches its kernels one by one. (Graphs
        are only ever used on CUDA, for decode-only steps; see minivllm/worker/cuda_graph.py.)
    tensor_parallel_size: split every layer over this many processes, one per GPU (CPU
        processes with device="cpu"); the engine starts the other N - 1 itself. The model's
        query heads must divide by N, its KV heads divide by N or N by them, its MLP width
        divide by N; on CUDA there must be N GPUs. See docs/tensor_parallel.md.
    all_reduce: how tensor-parallel ranks sum their partial results. "dist" always uses
        `torch.distributed.all_reduce` (NCCL on GPUs, gloo on CPU); "peer" sends small
        (decode-sized) sums through peer GPU memory in one kernel (PyTorch's symmetric memory,
        see minivllm/distributed/peer_all_reduce.py) and raises if it cannot; "auto" does that
        for two GPUs with a peer-to-peer link and uses "dist" otherwise.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    all_reduce: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty path to a model directory, got {self.model!r}")
        read_config_json(self.model)  # a model directory at all? (raises naming what is wrong)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed must be < 2**64 (torch.manual_seed's range), got {self.seed}")
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_bool("enforce_eager", self.enforce_eager)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        _check_choice("all_reduce", self.all_reduce, ALL_REDUCE_CHOICES)
        self._check_runnable()
        self._check_tensor_parallel()

    def _check_runnable(self) -> None:
        """The device exists and the attention backend can run on it: fail now, not in step 1."""
        from minivllm.kernels import resolve_backend

        device = self.torch_device  # raises for device="cuda" without a GPU
        try:
            resolve_backend(self.attention_backend, device)
        except ValueError as err:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} cannot run on {device.type}: {err}"
            ) from None

    def _check_tensor_parallel(self) -> None:
        """The model splits into `tensor_parallel_size` equal shards, and there are enough GPUs."""
        import torch

        n = self.tensor_parallel_size
        if n == 1:
            return
        where = f"{Path(self.model) / 'config.json'}"
        hf_config = read_config_json(self.model)
        heads = hf_config.get("num_attention_heads")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ValueError(f"tensor_parallel_size={n} needs the number of attention heads, but {where} "
                             f"has no valid num_attention_heads ({heads!r})")
        kv_heads = hf_config.get("num_key_value_heads") or heads
        width_key = next((k for k in ("intermediate_size", "ffn_dim") if k in hf_config), None)
        problems = []
        if heads % n:
            problems.append(f"num_attention_heads={heads} is not divisible by it (every rank holds "
                            "the same number of whole query heads)")
        if kv_heads % n and n % kv_heads:
            problems.append(f"num_key_value_heads={kv_heads} neither divides by it nor divides it (each "
                            "rank needs a whole share of the KV heads, or one replicated KV head)")
        if width_key is not None and hf_config[width_key] % n:
            problems.append(f"{width_key}={hf_config[width_key]} is not divisible by it (the MLP is "
                            "split by channels)")
        if problems:
            raise ValueError(f"tensor_parallel_size={n} cannot split the model in {where}: "
                             + "; ".join(problems))
        if self.torch_device.type == "cuda" and n > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs (one per rank), but torch sees "
                             f"{torch.cuda.device_count()}")
        if self.all_reduce == "peer":
            from minivllm.distributed.peer_all_reduce import unavailable_reason

            reason = unavailable_reason(n, self.torch_device)
            if reason is not None:
                raise ValueError(f"all_reduce='peer' cannot run with tensor_parallel_size={n}: {reason}")

    @property
    def torch_device(self):
        """The resolved torch.device ("auto" becomes cuda when a GPU is present)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise ValueError(f"device='cuda' cannot be used: {why}; use device='cpu' or device='auto'")
        return torch.device(self.device)

    @property
    def torch_dtype(self):
        """The resolved torch dtype: float32 on CPU and bfloat16 on CUDA unless set."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def hf_context_length(self) -> int | None:
        """The trained context length from the directory's config.json (`context_length`)."""
        return context_length(self.model)


@dataclass
class CacheConfig:
    """How the paged KV cache is laid out and sized.

    block_size: tokens per KV block (the page size of PagedAttention).
    num_kv_blocks: an explicit pool size; overrides both memory budgets (handy in tests).
    kv_cache_memory_bytes: the KV budget on CPU, where there is no "free memory" to measure.
    gpu_memory_utilization: on CUDA, the fraction of the GPU's memory this engine may use in all
        (weights + activations + KV); the KV pool gets what is left of it after the weights and a
        profiled forward pass.
    enable_prefix_caching: reuse the KV blocks of a previously computed identical prefix.
    kv_cache_dtype: "auto" stores K/V in the model's dtype; "fp8" in 8 bits (e4m3) with one float32
        scale per token and KV head (minivllm/kernels/fp8.py): about half the bytes, so about twice the
        blocks in the same memory and half the bytes a decode step reads. EngineConfig resolves it
        into `kv_cache_spec`, which is what the engine below the config reads.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * MiB
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("num_kv_blocks", self.num_kv_blocks, minimum=1, allow_none=True)
        _check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, minimum=1)
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(
            self.gpu_memory_utilization, (int, float)
        ):
            raise TypeError(
                f"gpu_memory_utilization must be a number, got {self.gpu_memory_utilization!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        _check_bool("enable_prefix_caching", self.enable_prefix_caching)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)


@dataclass
class SchedulerConfig:
    """How requests are batched, step by step.

    max_num_seqs: most sequences in flight (running) at once, hence per step.
    max_num_batched_tokens: the per-step token budget, prefill and decode tokens together.
        None picks 2048 (raised to max_num_seqs, and to max_model_len without chunked prefill)
        once max_model_len is known.
    enable_chunked_prefill: split a prompt that does not fit the step's budget over several steps,
        so one long prompt cannot stall the decodes of everyone else.
    prefill_chunk_size: optional cap on the tokens one prompt computes per step (the seed's
        "chunk size"); None means only the budget limits it. Needs chunked prefill.
    max_model_len: longest sequence (prompt + output) served; None takes the model's trained
        context length from its config.json.
    history_size: how many per-step records the engine keeps for stats and plots.
    async_scheduling: plan and launch step n+1 while the GPU still runs step n (overlap; see
        engine/llm_engine.py). Outputs are the same with it off, where each step runs start to
        finish: slower on a GPU, easier to follow and debug.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    prefill_chunk_size: int | None = None
    max_model_len: int | None = None
    history_size: int = 10_000
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, minimum=1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1, allow_none=True)
        _check_bool("enable_chunked_prefill", self.enable_chunked_prefill)
        _check_int("prefill_chunk_size", self.prefill_chunk_size, minimum=1, allow_none=True)
        _check_int("max_model_len", self.max_model_len, minimum=2, allow_none=True)
        _check_int("history_size", self.history_size, minimum=0)
        _check_bool("async_scheduling", self.async_scheduling)
        if self.prefill_chunk_size is not None and not self.enable_chunked_prefill:
            raise ValueError("prefill_chunk_size needs enable_chunked_prefill=True")
        if self.max_num_batched_tokens is None and self.max_model_len is not None:
            self.max_num_batched_tokens = self._default_token_budget()
        if self.max_num_batched_tokens is not None:
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                    f"max_num_seqs ({self.max_num_seqs}), or not every running sequence could "
                    "decode in one step"
                )
            if (
                not self.enable_chunked_prefill
                and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len
            ):
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) is below max_model_len "
                    f"({self.max_model_len}): without chunked prefill a whole prompt must fit in one "
                    "step; raise max_num_batched_tokens, lower max_model_len or set "
                    "enable_chunked_prefill=True"
                )

    def _default_token_budget(self) -> int:
        """2048 tokens a step (at least one decode per sequence); without chunked prefill, at
        least max_model_len, so that the longest prompt fits in one step."""
        budget = max(2048, self.max_num_seqs)
        if not self.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        return budget

    @property
    def is_resolved(self) -> bool:
        """True once max_model_len (and with it the token budget) is known."""
        return self.max_model_len is not None and self.max_num_batched_tokens is not None


def resolve_kv_cache_spec(kv_cache_dtype: str, model_dtype, attention_backend: str,
                          device) -> KVCacheSpec:
    """The cache format `kv_cache_dtype` names: the model's dtype ("auto"), or e4m3 with its
    scales ("fp8"). The kernels say whether the attention backend can read it on `device` (the
    extension reads 16-bit caches only; Triton's e4m3 needs compute capability 8.9)."""
    spec = KVCacheSpec(FP8_DTYPE if kv_cache_dtype == "fp8" else model_dtype)
    reason = spec.unsupported_reason(attention_backend, device)
    if reason is not None:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} cannot run with "
                         f"attention_backend={attention_backend!r} here: {reason}")
    return spec


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses a sequence's next tokens, and one forward pass of
    the model checks them all (docs/speculative_decoding.md).

    method: "ngram" (prompt lookup: the tokens that followed the latest earlier occurrence of
        the sequence's last n tokens, in its prompt or its output) or "draft" (a smaller model
        with the same vocabulary, run by the same engine on its own KV cache).
    num_speculative_tokens: k, the most draft tokens one sequence verifies in one step.
    prompt_lookup_max / prompt_lookup_min: "ngram" only: the longest and the shortest n tried,
        longest first (defaults 4 and 2).
    model: "draft" only: the draft model's directory. It must share the target's vocabulary
        (checked when the engine loads it).
    disable_by_batch_size: a step planned while more sequences than this are running does not
        speculate: a large batch keeps the GPU busy already, and verifying guesses then costs
        more than it saves. None: never off.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        _check_choice("speculative_config.method", self.method, SPECULATIVE_METHODS)
        _check_int("speculative_config.num_speculative_tokens", self.num_speculative_tokens, minimum=1)
        _check_int("speculative_config.disable_by_batch_size", self.disable_by_batch_size, minimum=1,
                   allow_none=True)
        if self.method == "ngram":
            self._check_ngram()
        else:
            self._check_draft()

    def _check_ngram(self) -> None:
        if self.model is not None:
            raise ValueError("speculative_config.model is for method 'draft'; 'ngram' needs no model")
        if self.prompt_lookup_max is None:
            self.prompt_lookup_max = max(4, self.prompt_lookup_min or 0)
        if self.prompt_lookup_min is None:
            self.prompt_lookup_min = min(2, self.prompt_lookup_max)
        _check_int("speculative_config.prompt_lookup_max", self.prompt_lookup_max, minimum=1)
        _check_int("speculative_config.prompt_lookup_min", self.prompt_lookup_min, minimum=1)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    def _check_draft(self) -> None:
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if getattr(self, name) is not None:
                raise ValueError(f"speculative_config.{name} is for method 'ngram', not 'draft'")
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("speculative_config.model: method 'draft' needs the draft model's directory, "
                             f"got {self.model!r}")
        read_config_json(self.model)

    @classmethod
    def from_value(cls, value: Any) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, or a dict of its fields (a JSON object on the command line)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"speculative_config must be a dict (or None), got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in speculative_config; known: {sorted(known)}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config needs {name!r}")
        return cls(**value)




@dataclass
class EngineConfig:
    """Model + cache + scheduler (+ speculative decoding) configuration of one engine, and what
    it resolves to once: `kv_cache_spec`, the format of the KV cache
    (minivllm/kernels/kv_cache_spec.py)."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: SpeculativeConfig | None = None
    kv_cache_spec: KVCacheSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, cls in (("model_config", ModelConfig), ("cache_config", CacheConfig),
                          ("scheduler_config", SchedulerConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        self._resolve_max_model_len()
        model = self.model_config
        self.kv_cache_spec = resolve_kv_cache_spec(self.cache_config.kv_cache_dtype, model.torch_dtype,
                                                   model.attention_backend, model.torch_device)
        self._check_speculative()

    def _check_speculative(self) -> None:
        """A draft model runs in the target's process on its KV cache: one rank only, for now,
        and it must reach as far as the target's max_model_len."""
        spec = self.speculative_config
        if spec is None or spec.method != "draft":
            return
        if self.model_config.tensor_parallel_size > 1:
            raise ValueError("speculative_config: method 'draft' does not run with tensor_parallel_size > 1 "
                             "yet; use method 'ngram'")
        reach = context_length(spec.model)
        if reach is not None and reach < self.scheduler_config.max_model_len:
            raise ValueError(f"speculative_config.model: the draft's context length ({reach}) is shorter than "
                             f"max_model_len ({self.scheduler_config.max_model_len})")

    def _resolve_max_model_len(self) -> None:
        """Take max_model_len from the model when unset; refuse one longer than it was trained for."""
        trained = self.model_config.hf_context_length()
        requested = self.scheduler_config.max_model_len
        if requested is None:
            if trained is None:
                raise ValueError(
                    f"max_model_len is not set and {Path(self.model_config.model) / 'config.json'} "
                    f"states no context length (none of {', '.join(_CONTEXT_LENGTH_KEYS)}); set "
                    "max_model_len"
                )
            # replace() re-runs SchedulerConfig's validation with the resolved length.
            self.scheduler_config = dataclasses.replace(self.scheduler_config, max_model_len=trained)
        elif trained is not None and requested > trained:
            raise ValueError(
                f"max_model_len ({requested}) is longer than the model's context length ({trained}) "
                f"in {self.model_config.model}/config.json"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineConfig:
        """Build from a flat dict ({"model": ..., "block_size": ...}) or a nested one.

        Nested form: {"model": {...} or "path", "cache": {...}, "scheduler": {...}} (the keys
        "model_config", "cache_config" and "scheduler_config" work too). A key that belongs to no
        config is an error, so a typo never passes silently. Speculative decoding is always the
        one key "speculative_config", a dict of `SpeculativeConfig` fields (or None).
        """
        if not isinstance(values, dict):
            raise TypeError(f"from_dict expects a dict, got {type(values).__name__}")
        values = dict(values)
        speculative = values.pop("speculative_config", None)
        sections: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}}
        owners = {
            **{f.name: "model" for f in dataclasses.fields(ModelConfig)},
            **{f.name: "cache" for f in dataclasses.fields(CacheConfig)},
            **{f.name: "scheduler" for f in dataclasses.fields(SchedulerConfig)},
        }
        for key, value in values.items():
            section = key.removesuffix("_config")
            if section in sections and isinstance(value, dict):
                for inner in value:
                    if owners.get(inner) != section:
                        raise ValueError(f"unknown key {inner!r} in the {section!r} config section")
                sections[section].update(value)
            elif key in owners:
                sections[owners[key]][key] = value
            else:
                raise ValueError(
                    f"unknown config key {key!r}; known keys: {sorted(owners)} (or the sections "
                    "'model', 'cache', 'scheduler', and 'speculative_config')"
                )
        if "model" not in sections["model"]:
            raise ValueError("the config needs 'model', the path to a model directory")
        return cls(
            model_config=ModelConfig(**sections["model"]),
            cache_config=CacheConfig(**sections["cache"]),
            scheduler_config=SchedulerConfig(**sections["scheduler"]),
            speculative_config=speculative,
        )

    def to_dict(self) -> dict[str, Any]:
        """The nested form, suitable for from_dict, JSON and logs."""
        spec = self.speculative_config
        return {
            "model": dataclasses.asdict(self.model_config),
            "cache": dataclasses.asdict(self.cache_config),
            "scheduler": dataclasses.asdict(self.scheduler_config),
            "speculative_config": None if spec is None else dataclasses.asdict(spec),
        }
