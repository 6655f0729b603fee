"""Atomic file writes: a reader sees either the old file or the whole new one, never a torn one.

Every durable artefact (caches, outcome tables, model directories, policies, checkpoints, reports,
profiles, manifests) is written to a temporary file beside its target, flushed and fsynced, then
renamed onto the target with `os.replace` (atomic on one file system). A writer that raises, or a
process killed mid-write, leaves the target as it was and, on an exception, no temporary file; a
SIGKILL can leave a temporary file, whose name (`.<name>.<pid>.<random>.tmp<suffix>`) marks it as
one (`stale_temporaries` finds them).

`atomic_path` yields the temporary path for writers that need a path (np.savez, torch.save, SB3's
`save`, matplotlib's `savefig`, safetensors' `save_file`); the temporary name keeps the target's
suffix, so writers that add a missing suffix (np.savez adds .npz, SB3 adds .zip) write exactly it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_MARK}{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory, which is then skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a normal exit it is fsynced and renamed onto `path`.

    On an exception the temporary file is removed and `path` is left untouched. The parent folder is
    created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {path} wrote nothing to {tmp}")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, data, indent: int | None = 1, end: str = "", **kwargs) -> Path:
    """Write `data` as JSON, followed by `end`, to `path` atomically; `kwargs` go to json.dumps."""
    return write_text(path, json.dumps(data, indent=indent, **kwargs) + end)


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files of atomic writes in `folder` (left by killed writers), safe to delete when no
    writer of this folder runs."""
    return sorted(p for p in Path(folder).glob(".*") if p.is_file() and TMP_MARK in p.name)
