"""Portability (macOS, Windows) simulated on Linux: a locale whose default encoding is not
UTF-8 (Windows' cp1252; here ASCII, stricter), no fcntl, no MPS float64, case-insensitive
file systems, manifests written with backslashes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# a non-UTF-8 default encoding, as on Windows (cp1252) or a Linux box without a UTF-8 locale
_ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                 "PYTHONIOENCODING": "utf-8"}


def _run(code: str, cwd: Path, extra_env: dict[str, str] | None = None,
         path: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHON"))}
    env["PYTHONPATH"] = os.pathsep.join([*(path or []), str(SRC)])
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=60)


def _text_opens_without_encoding(root: Path) -> list[str]:
    """Text-mode open/read_text/write_text calls that leave the encoding to the locale."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name not in ("open", "read_text", "write_text"):
                continue
            if isinstance(fn, ast.Attribute) and getattr(fn.value, "id", None) in ("os", "Image"):
                continue  # os.open (fd), PIL's Image.open (binary)
            if any(k.arg == "encoding" for k in node.keywords):
                continue
            if name == "open":
                pos = 1 if isinstance(fn, ast.Name) else 0  # open(path, mode) / p.open(mode)
                mode = [a.value for a in node.args[pos:pos + 1] if isinstance(a, ast.Constant)]
                mode += [k.value.value for k in node.keywords
                         if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if any("b" in m for m in mode):
                    continue
            found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_every_text_file_in_the_package_names_its_encoding():
    # Windows opens text as cp1252 by default: results.json, tables.md and an import's
    # journal, written as UTF-8, came back as mojibake ("—" as "â€”") or a decode error
    assert _text_opens_without_encoding(SRC / "causalign") == []


def test_benchmark_prints_non_ascii_tables_under_a_non_utf8_locale(tmp_path):
    # (the child's source is ASCII: a -c argument is decoded in the locale too)
    # the shipped suites' titles hold "—"; `benchmark` echoed tables.md read in the
    # locale's encoding: a UnicodeDecodeError traceback after every run had finished
    proc = _run("""
        import sys
        from pathlib import Path
        import causalign.engine.benchmark as bm
        def fake_run_suite(suite, out, **kw):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "tables.md").write_bytes("## T\\u00e4ble \\u2014 one\\n".encode("utf-8"))
            return {"runs": [], "report": None}
        bm.run_suite = fake_run_suite
        from causalign.cli import main
        sys.exit(main(["benchmark", "quick", "--out", "BM", "--no-report"]))
    """, tmp_path, _ASCII_LOCALE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Täble — one" in proc.stdout


def _tiny_dataset(root: Path, ids: list[str]) -> Path:
    import numpy as np

    from causalign.data.format import DatasetMeta, DatasetWriter

    w = DatasetWriter(root, DatasetMeta("toy", ["a", "b"], ["m"]))
    for k, sid in enumerate(ids):
        w.add(np.full((8, 8), k / 10, np.float32), label=k % 2, split="train",
              mask=np.ones((8, 8), np.uint8), attributes=[1.0], sample_id=sid)
    w.close()
    return root


def test_writer_refuses_ids_differing_only_in_case(tmp_path):
    import pytest

    from causalign.errors import DataError

    # images/A.png and images/a.png are one file on macOS/Windows: the second sample
    # silently replaced the first's image and mask there
    with pytest.raises(DataError, match="differs only in case or Unicode form from 'A'"):
        _tiny_dataset(tmp_path / "d", ["A", "a"])
    # macOS also ignores the Unicode form: 'é' as one code point or as e + combining accent
    with pytest.raises(DataError, match="differs only in case or Unicode form"):
        _tiny_dataset(tmp_path / "e", ["caf\u00e9", "cafe\u0301"])


def test_manifest_refuses_ids_differing_only_in_case(tmp_path):
    import pytest

    from causalign.data.format import MANIFEST, read_manifest
    from causalign.errors import DataError

    root = _tiny_dataset(tmp_path / "d", ["Case1", "x"])
    path = root / MANIFEST
    rows = path.read_text(encoding="utf-8").splitlines()
    # a second sample 'case1' with its own image: per-sample outputs (maps/case1.npy,
    # cf/case1.npy) overwrite Case1's on a case-insensitive file system
    rows.append(rows[2].replace("x,", "case1,", 1))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'case1' differs only in case or Unicode form from "
                                        r"id 'Case1' on line 2"):
        read_manifest(root)


def test_manifest_paths_with_backslashes_read_on_posix(tmp_path):
    import torch

    from causalign.data.format import MANIFEST, LesionDataset

    root = _tiny_dataset(tmp_path / "d", ["s0", "s1"])
    path = root / MANIFEST
    text = path.read_text(encoding="utf-8")
    # as written on Windows: images\s0.png, masks\s0.png
    path.write_text(text.replace("images/", "images\\").replace("masks/", "masks\\"),
                    encoding="utf-8")
    ds = LesionDataset(root, "train")
    assert len(ds) == 2 and ds.records[1].image == "images/s1.png"
    assert torch.allclose(ds.batch(torch.tensor([1]))["image"], torch.full((1, 1, 8, 8), 0.1),
                          atol=1 / 255)
    assert bool(ds.has_mask.all())


# ------------------------------------------------------------------ folder lock without fcntl


def test_import_and_folder_lock_without_fcntl_or_msvcrt(tmp_path):
    # neither POSIX nor Windows locking: the package imports and the lock degrades to none
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(
        "import sys\nsys.modules['fcntl'] = None\nsys.modules['msvcrt'] = None\n",
        encoding="utf-8")
    proc = _run("""
        import causalign, causalign.cli
        from causalign import io
        assert io.fcntl is None and getattr(io, "msvcrt", None) is None
        with io.folder_lock("OUT", "causalign train"):
            io.check_folder_free("OUT")
            print("ran unlocked")
    """, tmp_path, path=[str(stub)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ran unlocked" in proc.stdout


class _FakeMsvcrt:
    """msvcrt.locking's contract, on POSIX record locks: an exclusive lock of `n` bytes
    from the current position, OSError(EACCES) at once when another process holds it."""

    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def locking(self, fd: int, mode: int, n: int) -> None:
        import errno
        import fcntl

        self.calls.append(mode)
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        op = fcntl.LOCK_UN if mode == self.LK_UNLCK else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.lockf(fd, op, n, pos, os.SEEK_SET)
        except OSError as exc:
            raise OSError(errno.EACCES, "Permission denied") from exc


# a Windows process holding the folder lock: the byte `_MSVCRT_LOCK_OFFSET` locked, its note
# at the start of the file (plain Python, no torch: it starts at once)
_WIN_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1 << 20, os.SEEK_SET)
os.write(fd, b"pid 4242 on winbox, `causalign train`")
print("locked", flush=True)
sys.stdin.read()
"""


def test_folder_lock_on_windows_uses_msvcrt(tmp_path, monkeypatch):
    import pytest

    from causalign import io as cio

    fake = _FakeMsvcrt()
    monkeypatch.setattr(cio, "fcntl", None)
    monkeypatch.setattr(cio, "msvcrt", fake, raising=False)
    folder = tmp_path / "run"
    # alone: locked (note written, byte lock taken), released, the folder it created removed
    with cio.folder_lock(folder, "causalign train"):
        note = (folder / cio.LOCK_NAME).read_text(encoding="utf-8")
        assert note.startswith(f"pid {os.getpid()} ")
    assert fake.calls == [fake.LK_NBLCK, fake.LK_UNLCK]
    assert not folder.exists()
    # held by another process: refused at once, naming it (its note is readable past the
    # locked byte); before the fix the folder was simply written by both
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _WIN_HOLDER, str(folder / cio.LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cio.FolderInUse, match="winbox"):
            cio.check_folder_free(folder)
        with pytest.raises(cio.FolderInUse, match=r"another causalign process \(pid 4242"):
            with cio.folder_lock(folder, "causalign train"):
                pass
    finally:
        holder.communicate("", timeout=10)
    with cio.folder_lock(folder, "causalign train"):  # its holder gone: free again
        pass
    assert folder.is_dir() and not (folder / cio.LOCK_NAME).exists()


def test_folder_lock_in_a_folder_named_with_non_utf8_bytes(tmp_path):
    import pytest

    from causalign import io as cio

    if sys.platform in ("win32", "darwin"):
        pytest.skip("file names there are always Unicode")
    # b'R\xfcN' (Latin-1), as a shell passes it: Python decodes it to 'R\udcfcN'
    folder = tmp_path / os.fsdecode(b"R\xfcN")
    with cio.folder_lock(folder, f"causalign train --out {folder}"):
        note = (folder / cio.LOCK_NAME).read_bytes()
    assert b"R\\udcfcN" in note and not folder.exists()


def test_atomic_save_retries_a_replace_windows_refuses_while_the_file_is_read(tmp_path,
                                                                              monkeypatch):
    from causalign import io as cio

    # Windows: replacing checkpoint.pt fails while `evaluate` (another process) has it open;
    # training died with PermissionError at its next checkpoint
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) <= 2:
            raise PermissionError(13, "Access is denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(cio.os, "replace", replace)
    monkeypatch.setattr(cio.time, "sleep", lambda s: None)
    digest = cio.atomic_torch_save(tmp_path / "checkpoint.pt", {"epoch": 3})
    assert calls == ["checkpoint.pt.sha256.pending", "checkpoint.pt.sha256.pending",
                     "checkpoint.pt.sha256.pending", "checkpoint.pt", "checkpoint.pt.sha256"]
    assert cio.verified_bytes(tmp_path / "checkpoint.pt") is not None
    assert (tmp_path / "checkpoint.pt.sha256").read_text(encoding="utf-8").strip() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt",
                                                           "checkpoint.pt.sha256"]


def test_benchmark_run_folders_of_labels_differing_only_in_case_differ(tmp_path):
    from causalign.engine.benchmark import load_suite, plan

    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""
        name: s
        datasets:
          pm: {synth: {n_train: 8, n_val: 4, n_test: 4, size: 32}}
        experiments:
          t:
            datasets: [pm]
            methods: [{name: erm, label: ERM}, {name: erm, label: erm, set: {lr: 0.01}}]
            seeds: [0]
    """), encoding="utf-8")
    keys = [s.key for s in plan(load_suite(str(suite)))]
    # runs/pm/ERM/seed0 and runs/pm/erm/seed0 are one folder on macOS/Windows: the second
    # run found the first's results there
    assert len(keys) == 2 and len({k.casefold() for k in keys}) == 2, keys


def test_mps_is_refused_saying_why_and_what_to_use():
    import pytest
    import torch

    from causalign.engine.config import TrainConfig, apply_overrides
    from causalign.engine.trainer import resolve_device
    from causalign.errors import CausalignError

    # a Mac user's `--device mps` / `--set device=mps` read like a typo ("must be auto, cpu
    # or cuda[:k]"); auto never picks MPS, so it runs on the CPU
    why = r"Apple MPS is not supported .* use cpu, which auto picks"
    with pytest.raises(CausalignError, match=why):
        resolve_device("mps")
    with pytest.raises(CausalignError, match=why):
        resolve_device(torch.device("mps"))
    with pytest.raises(CausalignError, match=why):
        apply_overrides(TrainConfig(), {"device": "mps"})
    with pytest.raises(CausalignError, match=r"got 'tpu'$"):
        resolve_device("tpu")


def test_help_redirected_to_a_cp1252_file_does_not_crash(monkeypatch):
    import io

    from causalign.cli import main

    # Windows: stdout redirected to a file or pipe is cp1252, errors 'strict'; the help's
    # '→' (demo: "benchmark → train each method → tables") ended `causalign --help > f`
    # with a UnicodeEncodeError traceback
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="cp1252", errors="strict", newline="\n")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["--help"]) == 0
    out.flush()
    text = raw.getvalue().decode("cp1252")
    assert "benchmark \\u2192 train" in text
    assert out.errors == "strict"  # restored for whoever writes after the command


def test_writer_refuses_ids_windows_cannot_name_a_file_by(tmp_path):
    import pytest

    from causalign.errors import DataError

    # 'a:b' wrote images/a:b.png on Linux; on Windows (NTFS) that is a hidden stream of a
    # file 'a', and 'con' is the console device
    with pytest.raises(DataError, match=r"'a:b' is not usable as a file name on Windows "
                                        r"\(contains ':'\)"):
        _tiny_dataset(tmp_path / "d1", ["a:b"])
    with pytest.raises(DataError, match="'Con' is a device name"):
        _tiny_dataset(tmp_path / "d2", ["x", "Con"])
    _tiny_dataset(tmp_path / "d3", ["console", "com10", "a.b"])  # ordinary names pass


def test_export_manifest_names_reaching_outside_on_windows_are_ignored(tmp_path):
    import json

    from causalign.explain.export import OwnedFiles

    out = tmp_path / "out"
    out.mkdir()
    # on Windows these name files outside OUT, which `finish` then deleted (the POSIX
    # check saw one plain file name in each)
    names = ["..\\victim.txt", "C:\\Users\\me\\victim.txt", "\\victim.txt", "C:victim.txt",
             "maps\\..\\..\\victim.txt", "maps/a.npy"]
    (out / ".causalign-explain.json").write_text(json.dumps(names), encoding="utf-8")
    owned = OwnedFiles(out, ".causalign-explain.json", planned=[])
    assert owned.previous == {"maps/a.npy"}


def test_manifest_ids_windows_cannot_name_files_by_are_refused_there(tmp_path, monkeypatch):
    import pytest

    from causalign.data.format import MANIFEST, read_manifest
    from causalign.errors import DataError

    root = _tiny_dataset(tmp_path / "d", ["s0", "s1"])
    path = root / MANIFEST
    path.write_text(path.read_text(encoding="utf-8").replace("\ns1,", "\na:b,"),
                    encoding="utf-8")
    assert [r.id for r in read_manifest(root)] == ["s0", "a:b"]  # Linux: a file name
    monkeypatch.setattr(sys, "platform", "win32")
    # Windows: explain wrote maps/a:b.npy, a hidden stream of a file 'a', not an error
    with pytest.raises(DataError, match=r":3: id 'a:b' is not usable as a file name on "
                                        r"Windows \(contains ':'\)"):
        read_manifest(root)
