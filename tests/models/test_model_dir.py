"""A model directory appears complete or not at all (minivllm/models/model_dir.py)."""

from __future__ import annotations

import pytest

from minivllm.models import make_random_model
from minivllm.models.model_dir import new_model_dir


def test_the_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with new_model_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists() and tmp.parent == tmp_path
    assert [p.name for p in target.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not left private as mkdtemp made it


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_leaves_nothing_and_the_old_model_untouched(tmp_path, error):
    with pytest.raises(error), new_model_dir(tmp_path / "new") as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise error
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("old")
    with pytest.raises(error), new_model_dir(old, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        raise error
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "config.json").read_text() == "old"


def test_overwrite_replaces_every_old_file(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard")
    with pytest.raises(FileExistsError, match="overwrite=True"), new_model_dir(target):
        pass
    with new_model_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_empty_directory_is_filled_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    make_random_model(tmp_path / "empty", arch="llama", size="tiny")
    assert (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError):
        make_random_model(tmp_path / "a-file", arch="llama", size="tiny")


def test_a_random_model_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    from minivllm.models import random_model

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(random_model, "save_tokenizer", fail)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        make_random_model(tmp_path / "model", arch="llama", size="tiny")
    assert list(tmp_path.iterdir()) == []


def test_a_model_written_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(FileExistsError), new_model_dir(target) as tmp:
        (tmp / "config.json").write_text("mine")
        target.mkdir()
        (target / "config.json").write_text("theirs")  # another process finished first
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
