"""Write a model directory all at once, or not at all.

    with new_model_dir("/tmp/my-model", overwrite=False) as tmp:
        model.save_pretrained(tmp)          # write everything into `tmp` ...
    # ... and only now does /tmp/my-model appear, complete

A model is written into a hidden sibling of the target (same filesystem, so the final step is a
rename) and takes the target's name only when every file is in place. If writing fails or is
interrupted, the sibling is removed and the target is untouched: no half-written model, and no
empty directory that the next command would mistake for one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_model_dir(out_dir, overwrite: bool) -> Path:
    """Fail before any work if `out_dir` cannot receive a model."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; choose a new directory or pass overwrite=True")
    return out_dir


@contextmanager
def new_model_dir(out_dir, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it replaces `out_dir`.

    overwrite: replace a non-empty `out_dir` (its old files go, none is mixed with the new model).
    """
    out_dir = check_model_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        check_model_dir(out_dir, overwrite)  # again: another process may have written one meanwhile
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _replace_dir(new: Path, target: Path) -> None:
    """Give `new` the name `target`: the old one (if any) is moved aside first, then deleted."""
    umask = os.umask(0)
    os.umask(umask)
    new.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); a model directory is not
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        target.rename(old / target.name)
    try:
        new.rename(target)
    except OSError:
        if old is not None:  # put the old model back
            (old / target.name).rename(target)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)
