"""Atomic file output: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def _atomic_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], object],
                  before_replace: Callable[[], None] | None = None) -> None:
    """``write(fh)`` into a temporary file beside ``path``, then rename it over ``path``;
    ``before_replace`` runs after the data is on disk and before the rename."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail naming the temporary file, after the work
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the
        # umask), so results and checkpoints stay readable by the group as usual
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # a failed write or fsync (a full disk, a quota) names no file: name the output,
            # so the CLI's one line says which file could not be written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def remove_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporaries ``.NAME.<random>.tmp`` that a SIGKILL during an atomic write
    of NAME (one of ``names``, plain file names in ``folder``) left there: no later write
    removes them. The folder is listed once, however many names (an export's thousands of
    maps). Only for folders one process writes at a time: another writer's temporary would
    go from under it."""
    folder, wanted = Path(folder), set(names)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # none yet (or unreadable: the write itself will say so)
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")) or "." not in name[1:-4]:
            continue
        if name[1:-4].rsplit(".", 1)[0] in wanted and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """`np.save` through a temporary file: a kill mid-write leaves the old file or none,
    never a truncated .npy that a reader takes as valid. Writes to ``path`` exactly (no
    ``.npy`` appended, unlike np.save with a name lacking it)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    _atomic_bytes(path, buf.getvalue())


def atomic_torch_save(path: str | Path, obj: Any) -> str:
    """Save with torch.save atomically; returns the SHA-256 of the bytes (stored beside it).

    Two files cannot be replaced in one step, so the new digest is first written to
    ``PATH.sha256.pending``, then the data replaced, then the pending digest renamed over
    ``PATH.sha256``. A kill at any point leaves the data matching ``.sha256`` or
    ``.sha256.pending`` (`verified_bytes` accepts either), never a false "corrupt".
    """
    # Streamed into the temporary file and hashed on the way: serialised into memory first,
    # a checkpoint needed its whole size in RAM again on top of the state it was made of
    # (causal-align's warm-start cache: C·H·W·4 bytes per training sample, 5.6 GiB for 10k
    # RGB images of 224 px), at every epoch.
    hasher = hashlib.sha256()
    sha = Path(str(path) + ".sha256")
    pending = Path(str(path) + ".sha256.pending")
    _atomic_write(path, lambda fh: torch.save(obj, _HashingWriter(fh, hasher)),
                  before_replace=lambda: atomic_write_text(pending, hasher.hexdigest() + "\n"))
    os.replace(pending, sha)
    return hasher.hexdigest()


class _HashingWriter:
    """A write-only file for torch.save that feeds every chunk to ``hasher`` as well."""

    def __init__(self, fh: IO[bytes], hasher: Any) -> None:
        self.fh, self.hasher = fh, hasher

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def verified_bytes(path: str | Path) -> bytes | None:
    """The bytes of a file saved by `atomic_torch_save`, or None when they match neither its
    ``.sha256`` nor a ``.sha256.pending`` digest (a file without digest files is trusted)."""
    # A run still training replaces the file while it is read (`evaluate` or `counterfactual`
    # on a run mid-training): its pending digest vanishes (a FileNotFoundError from reading
    # it after seeing it), and a file read just before a save matched neither digest read
    # just after it (a false "corrupt"). Digests read before and after the data cover both:
    # the data read matched one of them whenever it was whole.
    # A file replaced again while being checked (saves faster than reads) is read anew; one
    # that stayed put and still matches no digest is corrupt.
    path = Path(path)
    for _ in range(5):
        before = _identity(path)
        digests = _digests(path)
        data = path.read_bytes()
        digests += _digests(path)
        if not digests or hashlib.sha256(data).hexdigest() in digests:
            return data
        if _identity(path) == before:
            break
    return None


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _digests(path: Path) -> list[str]:
    found = []
    for suffix in (".sha256", ".sha256.pending"):
        try:
            found.append(Path(str(path) + suffix).read_text().strip())
        except FileNotFoundError:  # none, or renamed since: the other read has it
            pass
    return found


def atomic_savefig(fig: Figure, path: str | Path, **kwargs) -> None:
    """matplotlib savefig through a temporary file."""
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    _atomic_bytes(path, buf.getvalue())
