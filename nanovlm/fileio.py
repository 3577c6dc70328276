"""Atomic file writing: a reader (or a crash) never sees a half-written file or directory.

Files and directories end with the permissions the umask allows (0666 / 0777 minus the umask,
as `open` and `os.makedirs` give), not the 0600 / 0700 of `tempfile`'s private names: a run
folder on a shared filesystem must be readable by the other accounts and nodes that serve or
resume from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    be read by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_umask_modes(directory: str | os.PathLike) -> None:
    """Give `directory`, and every directory and file below it, the modes the umask allows
    (files keep being executable if they were). For trees assembled under private temporary
    names, and for files that libraries write 0600 (safetensors does)."""
    dmode, fmode = dir_mode(), file_mode()
    os.chmod(directory, dmode)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dmode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, dmode if executable else fmode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def make_temp_dir_beside(path: str | os.PathLike) -> str:
    """A fresh temporary directory in the same folder as `path` (so a rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700
    return tmp


@contextlib.contextmanager
def written_dir(path: str | os.PathLike) -> Iterator[str]:
    """`with written_dir(OUT) as tmp:` write into `tmp`; on leaving, it replaces OUT whole
    (`replace_dir`), or, on an error, is removed: OUT is never half written."""
    tmp = make_temp_dir_beside(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str | os.PathLike) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst`. The old one is renamed away
    first, so at every instant either the old or the new complete directory exists. Everything
    in `src` gets the umask's modes first (`apply_umask_modes`)."""
    apply_umask_modes(src)
    dst = os.fspath(dst).rstrip("/")
    if os.path.isdir(dst):
        old = f"{dst}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
