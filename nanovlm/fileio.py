"""Atomic file writing: a reader (or a crash) never sees a half-written file or directory, and
what is written gets the modes the umask allows (not `tempfile`'s 0600 / 0700): a run folder on
a shared filesystem must be readable by the accounts that serve or resume from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask, from /proc where Linux shows it (`os.umask` sets it to read it: a race)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, IndexError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def apply_umask_modes(directory: str | os.PathLike) -> None:
    """Give `directory` and everything below it the modes the umask allows (executables stay executable)."""
    dmode, fmode = 0o777 & ~current_umask(), 0o666 & ~current_umask()
    os.chmod(directory, dmode)
    for root, dirs, files in os.walk(directory):
        for path in (os.path.join(root, name) for name in dirs + files):
            if not os.path.islink(path):
                os.chmod(path, dmode if os.path.isdir(path) or os.stat(path).st_mode & 0o111 else fmode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def make_temp_dir_beside(path: str | os.PathLike) -> str:
    """A fresh temporary directory in the same folder as `path` (so a rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
    return tmp


@contextlib.contextmanager
def written_dir(path: str | os.PathLike) -> Iterator[str]:
    """`with written_dir(OUT) as tmp:` write into `tmp`, which then replaces OUT whole (or, on an error, goes)."""
    tmp = make_temp_dir_beside(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str | os.PathLike) -> None:
    """Move directory `src` (given the umask's modes) to `dst`; an old `dst` is renamed away first."""
    apply_umask_modes(src)
    dst = os.fspath(dst).rstrip("/")
    if not os.path.isdir(dst):
        os.rename(src, dst)
        return
    old = f"{dst}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
