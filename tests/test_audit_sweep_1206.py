"""Repeated use in one process (audit 2026-12-06, sweeps and notebooks): a Ctrl-C in one
call must leave nothing that breaks the next call in the same process."""

from __future__ import annotations

import os
import socket

import pytest

from causalign import io as cio


def _fds_on(path) -> list[str]:
    """This process's open descriptors on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                out.append(fd)
        except OSError:  # listdir's own descriptor, closed by now
            pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd") or not cio._locking(),
                    reason="needs /proc and file locks")
@pytest.mark.parametrize("where", ["note", "check"])
def test_ctrl_c_while_taking_the_folder_lock_leaves_it_free(tmp_path, monkeypatch, where):
    # Ctrl-C after the flock was taken but before the lock was registered (writing the
    # holder's note, or checking the file it opened) kept the fd and its flock for the life
    # of the process: every later train/export into the folder was refused as "in use by
    # another causalign process"
    folder = tmp_path / "run"
    folder.mkdir()

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        if where == "note":
            m.setattr(socket, "gethostname", interrupt)
        else:
            m.setattr(os, "ftruncate", interrupt)
        with pytest.raises(KeyboardInterrupt), cio.folder_lock(folder, "first"):
            pass
    assert _fds_on(folder / cio.LOCK_NAME) == []
    if where == "note":  # ours for certain: removed (a file left would block nobody)
        assert not (folder / cio.LOCK_NAME).exists()
    with cio.folder_lock(folder, "again"):  # the next call in this process takes it
        assert (folder / cio.LOCK_NAME).exists()
    assert not (folder / cio.LOCK_NAME).exists()


@pytest.mark.skipif(not cio._locking(), reason="needs file locks")
def test_ctrl_c_while_taking_the_lock_of_a_new_folder_removes_the_folder(tmp_path,
                                                                         monkeypatch):
    # as a command that failed early leaves no folder
    folder = tmp_path / "new"
    monkeypatch.setattr(socket, "gethostname", lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), cio.folder_lock(folder, "first"):
        pass
    assert not folder.exists()
