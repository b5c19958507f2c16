"""What every tutorial needs: a tiny model made on the fly, `--out` and `--smoke` options.

The model is a random-weight Llama saved as a real Hugging Face directory (weights, config,
tokenizer) in a temporary folder: no download, a few seconds to build. Its text is gibberish (the
weights are random), but every block, step and tensor the engine handles is real.
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
    parser.add_argument("--model", default=None, help="a model directory to use instead of a random tiny one")
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


def heading(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}")
