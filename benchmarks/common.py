"""What the end-to-end benchmarks share: named model shapes, the environment record, the copy
bandwidth, JSON output.

The models are random-weight Hugging Face directories built locally from a named shape (see
`minivllm.models.random_model`): speed depends on the shapes, not on the values of the weights,
so no checkpoint is downloaded. Both minivllm and transformers load the same directory.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --model-config name -> (architecture, size for make_random_model)
MODEL_CONFIGS = {
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b"),
    "llama-3.2-1b": ("llama", "llama-3.2-1b"),
    "llama-3.1-8b": ("llama", "llama-3.1-8b"),
    "tiny": ("qwen3", "tiny"),  # a few hundred thousand parameters: the CPU smoke test
}


def build_model(name: str, out_dir: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """The random-weight model directory for `name` in `out_dir` (reused if already there)."""
    from minivllm.models import make_random_model

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    arch, size = MODEL_CONFIGS[name]
    out_dir = Path(out_dir) / f"{name}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    return make_random_model(out_dir, arch=arch, size=size, seed=seed, dtype=dtype, overwrite=True)


def setup_model(name: str, model_dir: Path | None, device: torch.device, seed: int,
                prefix: str) -> tuple[Path, torch.dtype, str | None]:
    """What every end-to-end benchmark does first: (model directory, dtype, CPU note).

    Prints the CPU disclaimer if there is one, picks bfloat16 on CUDA and float32 on CPU, and
    builds (or reuses) the random model under `model_dir`, or a fresh temporary directory.
    """
    note = cpu_disclaimer(device)
    if note:
        print(note)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = model_dir or Path(tempfile.mkdtemp(prefix=prefix))
    print(f"building the {name} model (random weights) in {root} ...", flush=True)
    return build_model(name, root, dtype, seed=seed), dtype, note


def release_memory(device: torch.device) -> None:
    """Free what the last engine or model left behind, so the next one starts from a clean pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: torch.device) -> dict:
    """Versions, device and date: what a number needs next to it to mean anything."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def cpu_disclaimer(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    return "CPU run: these numbers say nothing about GPU performance and are no GPU claim."


def measure_copy_bandwidth(device: torch.device, num_bytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written.

    The memory roofline of everything else in the same run: a step that must move B bytes cannot
    take less than B / this. On CUDA: median of CUDA-event timings after a warm-up.
    """
    import statistics
    import time

    if num_bytes is None:
        num_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * num_bytes / statistics.median(times)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                        repeats: int = 10) -> float:
    """FLOP/s of one large square `torch.mm` (2 n^3 FLOPs): the compute roofline of the same run.

    On CUDA: median of CUDA-event timings after a warm-up; on CPU float32 and a small n.
    """
    import statistics
    import time

    if device.type != "cuda":
        dtype, n = torch.float32, n or 512
    n = n or 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # a run killed mid-write never leaves a truncated file


def default_out(prefix: str, model_config: str, device: torch.device) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{prefix}_{model_config}_{device.type}_{stamp}.json"


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'100:1024' -> (100, 1024); '512' -> (512, 512). Both ends inclusive, >= 1."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            low = high = int(parts[0])
        elif len(parts) == 2:
            low, high = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name} must be N or LOW:HIGH (e.g. 100:1024), got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"{name} must satisfy 1 <= LOW <= HIGH, got {text!r}")
    return low, high
