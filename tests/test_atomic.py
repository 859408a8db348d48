"""The one atomic writer: the old file or the new one, never a torn one, and no leftovers."""

import errno
import os

import pytest

from ppl_vae.atomic import write_atomically
from ppl_vae.errors import CheckpointWriteError, WriteError


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "page.html"
    write_atomically(path, "old")
    write_atomically(path, b"new \xe2\x9c\x93")
    assert path.read_bytes() == b"new \xe2\x9c\x93"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "history.csv"
    write_atomically(path, "old")

    def read_only(*args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(WriteError, match="Read-only file system") as info:
        write_atomically(path, "new")
    assert info.value.exit_code == 4
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


def test_the_error_class_and_kind_are_the_callers(tmp_path):
    with pytest.raises(CheckpointWriteError, match="cannot write checkpoint"):
        write_atomically(tmp_path / "no" / "last.ckpt", b"x", what="checkpoint",
                         error=CheckpointWriteError)  # fmt: skip
