"""Crash-safe file writes: a temporary file or folder, fsync'd, then renamed into place (POSIX rename is atomic).

A reader never sees a half-written file or folder under its final name: a kill at any moment leaves either the old
version or the new one, plus at most a ``*.tmp-*`` or ``.trash-*`` leftover that the next writer removes.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Mapping

TRASH_PREFIX = ".trash-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that the renames and creations inside it survive a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows) refuse fsync on a directory
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync one file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (``root`` included), deepest first."""
    root = Path(root)
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _tmp_path(path: Path) -> Path:
    """A fresh name beside ``path`` (created by the writer with the usual umask, unlike mkstemp's 0600)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes a temporary file beside ``path``; it is fsync'd and renamed onto ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file + fsync + rename."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary file + fsync + rename."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file + fsync + rename."""
    from safetensors.torch import save_file

    return atomic_write_with(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def trash(path: str | os.PathLike, *, pause: Callable[[], None] | None = None) -> None:
    """Delete a folder crash-safely: rename it to ``.trash-<name>-<pid>`` first (out of every name a reader looks
    for), then delete it. A kill during the delete leaves only a ``.trash-*`` folder, which ``clean_trash`` removes."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    fsync_dir(path.parent)
    if pause is not None:  # tests: a window between the rename and the delete
        pause()
    shutil.rmtree(aside, ignore_errors=True)


def clean_trash(folder: str | os.PathLike, *, tmp_of: str | None = None) -> None:
    """Remove the ``.trash-*`` leftovers of killed deletes in ``folder`` (and ``<tmp_of>.tmp-*`` leftovers of killed
    ``publish_dir`` calls when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    patterns = [f"{TRASH_PREFIX}*"] + ([f"{tmp_of}.tmp-*"] if tmp_of else [])
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def new_tmp_dir(final: str | os.PathLike) -> Path:
    """A fresh, empty folder ``<final>.tmp-XXXX`` beside ``final``, to be filled and then ``publish_dir``'d."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the filled folder ``tmp`` at ``final``: fsync it, move an old ``final`` aside, rename ``tmp`` into place,
    then delete the old one. ``final`` is never deleted before its replacement is in place; a kill leaves either the
    old or the new folder at ``final`` (or, between the two renames, none, with the old one at ``.trash-*``)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def recover_dir(final: str | os.PathLike) -> None:
    """Undo a ``publish_dir`` killed between its two renames: with ``final`` missing, its old version is moved back
    from ``.trash-<name>-*``; leftovers of ``final``'s earlier writes are then removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    if not final.exists():
        aside = sorted(final.parent.glob(f"{TRASH_PREFIX}{final.name}-*"), key=lambda p: p.stat().st_mtime)
        if aside and aside[-1].is_dir():
            os.replace(aside[-1], final)
            fsync_dir(final.parent)
    for p in [*final.parent.glob(f"{TRASH_PREFIX}{final.name}-*"), *final.parent.glob(f"{final.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_dir(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a fresh temporary folder, which then replaces ``final`` through ``publish_dir``."""
    tmp = new_tmp_dir(final)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, final)
