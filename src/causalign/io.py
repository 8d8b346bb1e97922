"""Atomic file output: write to a temporary file in the same folder, then rename; and
`folder_lock`, one writing process per output folder."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import CausalignError, interrupt_behind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
msvcrt: Any = None
if fcntl is None:
    try:  # Windows: a byte-range lock (see `_lock`)
        import msvcrt
    except ImportError:  # pragma: no cover - neither: folders are not locked
        msvcrt = None


_umask_guard = threading.Lock()


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc, since
    4.7). Reading it by setting it changed it for the whole process meanwhile: a file
    another thread created then got 0644 under a 077 umask, and two threads reading at
    once left it at 022 for good (the second read the first's placeholder and restored
    that)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_guard:  # elsewhere: set and restored, never by two threads at once
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# Windows refuses to replace a file another process has open (Python opens files without
# FILE_SHARE_DELETE): `evaluate` reading checkpoint.pt while the run trains, an indexer or a
# virus scanner. A short retry rides out such reads; POSIX replaces at once.
_REPLACE_RETRIES = (0.01, 0.03, 0.1, 0.3, 1.0)


def replace(src: str | Path, dst: str | Path) -> None:
    """`os.replace`, retried on Windows while ``dst`` is briefly held open elsewhere."""
    for wait in (*_REPLACE_RETRIES, None) if sys.platform == "win32" else (None,):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if wait is None or Path(dst).is_dir():
                raise
            time.sleep(wait)


def _atomic_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_file(path: str | Path, write: Callable[[IO[bytes]], object],
                      fsync: bool = True) -> None:
    """``write(fh)`` into a new temporary file beside ``path`` (random name, created
    exclusively), then rename it over ``path``: a symbolic link planted at ``path`` or at a
    temporary's name is replaced, never written through. ``fsync=False`` for the many
    small files of a dataset, which were never synced one by one."""
    _atomic_write(path, write, fsync=fsync)


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], object],
                  before_replace: Callable[[], None] | None = None,
                  fsync: bool = True) -> None:
    """``write(fh)`` into a temporary file beside ``path``, then rename it over ``path``;
    ``before_replace`` runs after the data is on disk and before the rename."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail naming the temporary file, after the work
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    handled = sys.exc_info()[1]  # a caller's exception being handled: not an interrupt here
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the
        # umask), so results and checkpoints stay readable by the group as usual
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        interrupt = interrupt_behind(exc, handled)
        if interrupt is not None and interrupt is not exc:
            # Ctrl-C inside torch.save: its zip writer's clean-up then fails ("unexpected
            # pos"), and that RuntimeError hid the interrupt, so the CLI printed a traceback
            # and exited 1 instead of 130. The interrupt is what happened: raise it.
            raise interrupt from None
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


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf; NumPy's too) replaced by None: JSON has
    no NaN, and json.dumps's `NaN` / `Infinity` are refused by strict parsers (jq, JavaScript,
    Go). causalign's undefined metrics are null already; this keeps every writer to that."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as standard JSON (non-finite numbers as null, `finite_or_null`), atomically."""
    atomic_write_text(path, json.dumps(finite_or_null(obj), indent=2, sort_keys=False,
                                       allow_nan=False) + "\n")


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
    replace(pending, sha)
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
            found.append(Path(str(path) + suffix).read_text(encoding="utf-8").strip())
        except FileNotFoundError:  # none, or renamed since: the other read has it
            pass
    return found


def atomic_savefig(fig: Figure, path: str | Path, **kwargs) -> None:
    """matplotlib savefig through a temporary file."""
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    _atomic_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------- one writer per folder

LOCK_NAME = ".causalign.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform has none (Windows: no flock)
# folders this process holds: lock file path -> [fd, depth, owning thread]. flock conflicts
# between two open files of one process too, so a nested use (the CLI, then the trainer or an
# export it calls, on the same folder) must reuse the lock rather than refuse itself.
_held: dict[str, list[int]] = {}  # thread idents are ints too
_held_guard = threading.Lock()


class FolderInUse(CausalignError):
    """Another process (or thread) is writing the folder."""


def _in_use(folder: str | os.PathLike[str], path: str, who: str) -> FolderInUse:
    try:  # what the holder wrote: pid, host, command (empty if caught before it wrote)
        with open(path, encoding="utf-8", errors="replace") as fh:
            holder = " ".join(fh.read(500).split())
    except OSError:
        holder = ""
    return FolderInUse(f"{folder}: in use by {who} ({holder or 'pid unknown'}); wait for it "
                       f"to finish or choose another folder")


@contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Make this process the only causalign writer of ``folder`` while the block runs.

    An advisory ``fcntl.flock`` on ``FOLDER/.causalign.lock`` (the folder is created when
    missing): a second writer (the same job launched twice, a --resume while the run still
    trains) fails at once with `FolderInUse`, naming the holder's pid, host and command,
    instead of training the run twice, deleting the other's temporary files or interleaving
    its outputs. The lock file is removed on release, with the folder when it was created
    here and is left empty (a command that failed early leaves nothing). The kernel drops
    the lock when its holder dies, even by SIGKILL, so the lock file that leaves blocks
    nobody. Re-entrant in the owning thread. On Windows (no fcntl) an msvcrt byte-range lock
    does the same. Where locks are unsupported (a file system without them) or the lock
    file cannot be created (a read-only folder: the writes themselves will say so), the
    block runs unlocked, as before."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CausalignError(f"{folder}: exists and is not a folder")
    created = not folder.exists()
    if not _locking():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    # the folder resolved (a linked run folder is one folder), never the lock file itself:
    # a link planted at its name (a received run folder) made the lock truncate, write and
    # then delete the link's target
    path = os.path.join(os.path.realpath(folder), LOCK_NAME)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(path)
        if entry is not None:
            if entry[2] != me:
                raise _in_use(folder, path, "another thread of this process")
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    fd = _acquire(folder, path)
    if fd is None:
        yield
        return
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        info = f"pid {os.getpid()} on {socket.gethostname()}, `{command}` since {stamp}"
        try:
            # backslashreplace: a folder name that is not UTF-8 (legacy bytes, decoded by
            # Python to lone surrogates) made .encode raise, a traceback before any work
            os.write(fd, info.encode("utf-8", "backslashreplace"))
        except OSError:  # a full disk: the lock holds all the same
            pass
        entry = [fd, 1, me]
        with _held_guard:
            _held[path] = entry
    except BaseException:
        # Ctrl-C (a notebook) between taking the lock and registering it kept the fd and
        # its flock open for the life of the process: every later call on this folder was
        # refused as "in use by another causalign process"
        with _held_guard:
            if path in _held and _held[path][0] == fd:
                del _held[path]
        try:
            os.unlink(path)
            if created:
                os.rmdir(folder)  # only if empty, as on release
        except OSError:
            pass
        _unlock_and_close(fd)
        raise
    try:
        yield
    finally:
        with _held_guard:
            del _held[path]
        removed = False
        try:  # removed while still locked: whoever opened it meanwhile is refused, and
            os.unlink(path)  # `_acquire` skips a file unlinked after it opened it
            removed = True
            if created:
                os.rmdir(folder)  # only if empty: a failed command leaves no folder
        except OSError:
            pass
        finally:
            _unlock_and_close(fd)  # releases the lock
        if not removed:  # Windows: an open file cannot be removed; closed, it can
            try:
                os.unlink(path)
                if created:
                    os.rmdir(folder)
            except OSError:  # another process took it meanwhile (and holds it open)
                pass


# Windows' locks are mandatory byte-range locks: the byte locked lies far beyond the holder's
# note (pid, host, command), which the refused process must still be able to read.
_MSVCRT_LOCK_OFFSET = 1 << 20


def _locking() -> bool:
    return fcntl is not None or msvcrt is not None


def _lock(fd: int, shared: bool = False) -> None:
    """Lock ``fd`` without waiting (OSError when held elsewhere): flock where there is
    fcntl (shared for a check), else msvcrt's exclusive byte lock (Windows has no shared
    one: two checks at the same instant may refuse each other, once)."""
    if fcntl is not None:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return
    os.lseek(fd, _MSVCRT_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


def _unlock_and_close(fd: int) -> None:
    if fcntl is None and msvcrt is not None:
        try:  # closing releases it too, but Windows may do so only later
            os.lseek(fd, _MSVCRT_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
    os.close(fd)


def _busy(exc: OSError) -> bool:
    """Whether a failed `_lock` means another holder (not a file system without locks)."""
    codes = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
    if fcntl is None:  # msvcrt.locking: EACCES, or EDEADLOCK after its retries
        codes.add(getattr(errno, "EDEADLOCK", errno.EDEADLK))
    return exc.errno in codes


def _acquire(folder: Path, path: str) -> int | None:
    """An fd holding the flock of ``path`` (a new, empty lock file), None where this file
    system cannot lock; `FolderInUse` when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
        except OSError:
            if os.path.islink(path):  # ELOOP (O_NOFOLLOW): never write through it
                raise CausalignError(
                    f"{folder / LOCK_NAME}: is a symbolic link, not a lock file causalign "
                    f"wrote; remove it (its target is left alone)") from None
            return None
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if _busy(exc):
                raise _in_use(folder, path, "another causalign process") from None
            return None  # ENOLCK, EOPNOTSUPP...
        try:
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)  # a stale file of a killed holder names it still
                return fd
        except BaseException:  # Ctrl-C here left the flock held by a lost fd (as above)
            _unlock_and_close(fd)
            raise
        # its holder released and removed it as we opened it: take the new one
        _unlock_and_close(fd)


def check_folder_free(folder: str | Path) -> None:
    """Raise `FolderInUse` when another process holds `folder_lock` on ``folder``; takes
    nothing (a check before work that reads the folder, e.g. whether it holds a run, so that
    the refusal names the other process rather than what its half-written state looks like)."""
    path = os.path.join(os.path.realpath(folder), LOCK_NAME)  # as `folder_lock`
    with _held_guard:
        entry = _held.get(path)
    if entry is not None:
        if entry[2] != threading.get_ident():
            raise _in_use(folder, path, "another thread of this process")
        return
    if not _locking():
        return
    try:  # msvcrt.locking needs a handle open for writing
        fd = os.open(path, (os.O_RDONLY if fcntl is not None else os.O_RDWR) | _NOFOLLOW)
    except OSError:  # no lock file (unreadable, a link): nobody holds it
        return
    locked = False
    try:  # shared: two checks at once do not refuse each other
        _lock(fd, shared=True)
        locked = True
    except OSError as exc:
        if _busy(exc):
            raise _in_use(Path(folder), path, "another causalign process") from None
    finally:
        if locked:
            _unlock_and_close(fd)
        else:
            os.close(fd)
