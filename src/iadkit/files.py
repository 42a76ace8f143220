"""Writing files safely: atomically (never a half-written file) and with the user's umask.

Everything in iadkit that writes a file goes through here: model files, predictions, overlays,
reports, exported graphs, generated datasets. A write goes to a temporary file in the target's
folder, is flushed to disk, and is renamed over the target, so a killed process leaves either
the old file or the new one. Temporary files are created private (mode 0600) by the OS; the
finished file gets the permissions a plain ``open(..., "w")`` would give (0666 minus the umask).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_target(p) as tmp: write(tmp)`` — the caller writes a temporary file (same
    folder, same suffix, so format-sniffing writers behave); on success it gets the umask's
    permissions and is renamed over `p`; on any error it is removed and `p` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` via a temporary file + rename; returns the path."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable_dir(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Make sure `folder` exists (creating it) and can be written, before any long work starts.

    Raises `OutputPathError` saying which folder and why, so a user learns of a bad output
    path before training, not after.
    """
    from iadkit.errors import OutputPathError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"the {what} {folder} is a file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the {what} {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise OutputPathError(f"the {what} {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".iadkit-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"cannot write in the {what} {folder}: {exc.strerror or exc}") from None
    return folder


def check_writable_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Check that `path` can be (over)written before long work starts: its folder is writable
    and `path` is not a folder."""
    from iadkit.errors import OutputPathError

    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"the {what} {path} is a folder; give a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), f"folder of the {what}")
    return path


__all__ = ["atomic_target", "atomic_write_bytes", "atomic_write_text", "check_writable_dir", "check_writable_file"]
