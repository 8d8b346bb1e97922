"""What a user copies from README.md exists as written: every `causalign …` subcommand,
option and option value, every `--set key=value` setting, every `python benchmarks/X.py` flag,
`make` target, cited path, Layout file, anchor and the suite example; per-seed `train`
commands name their run folder; and the tables copied from stored results (Table 1, PPI,
deletion, cross-site) equal those files.

Static checks (the CLI's own click tree, argparse sources, the file system), so the whole file
runs in a few seconds; tests/test_readme.py runs the README's Python blocks.
"""

from __future__ import annotations

import csv
import glob
import itertools
import re
import shlex
import statistics
from functools import cache
from pathlib import Path

import pytest
import typer.main
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# README.md and the longer write-ups it links (docs/*.md): what a user copies from either
# must exist as written. Spans and commands cite paths from the repository root (a command
# runs there); markdown links and images are relative to the file, as GitHub renders them.
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOC_IDS = [str(d.relative_to(ROOT)) for d in DOCS]
per_doc = pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)

# Paths the README names that are written on demand, not shipped (the reason is in the README).
NOT_SHIPPED = {
    "benchmarks/results/gpu.json",  # bench_gpu.py writes it only on a CUDA machine
}


def _prose(text: str) -> str:
    """README text without its fenced blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _fenced(text: str, langs: tuple[str, ...] = ("bash",)) -> list[str]:
    return [b for lang, b in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in langs]


def _spans(text: str) -> list[str]:
    """Inline code spans (they may wrap over a line break), whitespace collapsed."""
    return [re.sub(r"\s+", " ", s).strip() for s in re.findall(r"`([^`]+)`", _prose(text))]


def _shell_lines(block: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def readme_commands(text: str) -> list[str]:
    """Every causalign / benchmark-script / make command shown in code blocks or spans."""
    cmds = [ln for b in _fenced(text) for ln in _shell_lines(b)]
    cmds += _spans(text)
    return cmds


def _tokens(cmd: str) -> list[str]:
    # table cells escape the alternatives' pipe, optional parts are in [ ]
    return cmd.replace("\\|", "|").replace("[", " ").replace("]", " ").split()


def causalign_invocations(text: str) -> list[tuple[str, list[str]]]:
    """(original command, tokens after `causalign`) for each causalign command shown."""
    out = []
    for cmd in readme_commands(text):
        toks = _tokens(cmd)
        for i, tok in enumerate(toks):
            # `causalign …`, `torchrun … -m causalign …`, `OMP_NUM_THREADS=1 causalign …`
            if tok == "causalign" and all(re.fullmatch(r"[A-Z_]+=\S*", t) for t in toks[:i]) \
                    or tok == "causalign" and toks[i - 1] == "-m":
                out.append((cmd, toks[i + 1:]))
                break
    return out


@cache
def _cli():  # typer's own click Group (typer vendors click)
    from causalign.cli import app

    return typer.main.get_command(app)


def _resolve(tokens: list[str]) -> tuple[list[str], object, list[str]]:
    """Walk the subcommand path; returns (path, command, remaining tokens)."""
    cmd = _cli()
    path: list[str] = []
    rest = list(tokens)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            raise AssertionError(f"`causalign {' '.join(path + rest[:1])}`: no such command; "
                                 f"valid: {', '.join(sorted(cmd.commands))}")
        path.append(rest.pop(0))
        cmd = sub
    return path, cmd, rest


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _placeholder(value: str) -> bool:
    """NAME, K, <v>, …, `erm,oracle,…`: stand-ins, not literal values."""
    return (not value or "…" in value or "<" in value or value.isupper()
            or value in ("value", "key=value") or re.fullmatch(r"[A-Z]+,?", value) is not None)


def _option_values(rest: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs; a flag followed by another option has value ''."""
    pairs = []
    for i, tok in enumerate(rest):
        if tok.startswith("--"):
            nxt = rest[i + 1] if i + 1 < len(rest) else ""
            pairs.append((tok, "" if nxt.startswith("--") else nxt))
    return pairs


def _check_set(key_value: str, method: str | None, where: str) -> None:
    """A `--set key=value` the README shows is accepted by the config layer."""
    from causalign.engine.config import TrainConfig, apply_overrides, parse_set, valid_keys
    from causalign.methods import build_method, method_names

    if "=" not in key_value:
        raise AssertionError(f"{where}: --set {key_value!r} is not key=value")
    key, raw = key_value.split("=", 1)
    if key in ("key", "method.<name>", "method.<key>", "method.<k>", "method.<p>",
               "model.<option>"):
        return  # the generic form
    if key.startswith("model."):  # a model option: accepted by a model that has it
        from causalign.models import MODEL_OPTIONS

        owners = [m for m, opts in MODEL_OPTIONS.items() if key.split(".", 1)[1] in opts]
        assert owners, f"{where}: --set {key}: no model has this option"
        if not _placeholder(raw):
            apply_overrides(TrainConfig(model=owners[0]), parse_set([key_value])).validate()
        return
    if key.startswith("method."):
        name = key.split(".", 1)[1]
        methods = [method] if method else method_names()
        owners = [m for m in methods if name in _method_params(m)]
        assert owners, (f"{where}: --set {key}: no such parameter of "
                        f"{method or 'any method'}")
        if not _placeholder(raw):
            value = parse_set([f"x={raw}"])["x"]
            build_method(owners[0], {name: value})  # raises on a value it refuses
        return
    assert key in valid_keys(), f"{where}: --set {key}: not a training config key"
    if not _placeholder(raw):
        apply_overrides(TrainConfig(), parse_set([key_value]))


@cache
def _method_params(name: str) -> dict:
    from causalign.methods import build_method
    from causalign.methods.base import resolved_params

    return resolved_params(build_method(name))


def _check_invocation(cmd: str, toks: list[str]) -> list[str]:
    """Problems with one causalign command as shown; [] when it is right."""
    from causalign.explain import explainer_names
    from causalign.methods import method_names
    from causalign.models import MODEL_NAMES

    problems = []
    try:
        path, command, rest = _resolve(toks)
    except AssertionError as exc:
        return [str(exc)]
    valid = _options(command)
    pairs = _option_values(rest)
    method = next((v for o, v in pairs if o == "--method" and not _placeholder(v)
                   and "|" not in v), None)
    if path == ["bench", "step"] and method is None:
        method = "erm"
    from causalign.data.synth import SHORTCUTS
    from causalign.explain.counterfactual import DISTANCES, OPTIMIZERS, SPACES

    choices = {"--method": set(method_names()), "--methods": set(method_names()),
               "--model": set(MODEL_NAMES), "--saliency": set(explainer_names()) | {"all"},
               "--shortcut": set(SHORTCUTS), "--optimizer": set(OPTIMIZERS),
               "--space": set(SPACES), "--distance": set(DISTANCES)}
    for opt, value in pairs:
        if opt not in valid:
            problems.append(f"`{cmd}`: `causalign {' '.join(path)}` has no option {opt}")
            continue
        if opt == "--model" and path == ["causal", "ccce"]:
            continue  # P(Y | A)'s model (logistic | frequency), not a network
        if opt in choices and not _placeholder(value):
            for v in re.split(r"[|,]", value):
                if v and v != "…" and v not in choices[opt]:
                    problems.append(f"`{cmd}`: {opt} {v}: not one of {sorted(choices[opt])}")
        if opt == "--set" and not _placeholder(value):
            try:
                _check_set(value, method, f"`{cmd}`")
            except Exception as exc:  # noqa: BLE001 - collect every problem, then fail once
                problems.append(str(exc))  # names the command already
    return problems


def test_readme_shows_the_cli() -> None:
    """The parser finds the commands (guards against a parser that silently matches none)."""
    found = {" ".join(_resolve(t)[0]) for _, t in causalign_invocations(README.read_text())}
    assert {"train", "evaluate", "explain", "counterfactual", "benchmark", "demo",
            "data synth", "data import", "bench step", "causal ccce", "causal pc"} <= found


@per_doc
def test_every_causalign_command_and_option_exists(doc: Path) -> None:
    problems = [p for cmd, toks in causalign_invocations(doc.read_text())
                for p in _check_invocation(cmd, toks)]
    assert not problems, "\n".join(problems)


def test_every_cli_subcommand_is_documented() -> None:
    """A subcommand the CLI has but the README never shows is undocumented."""
    shown = {" ".join(_resolve(t)[0]) for _, t in causalign_invocations(README.read_text())}
    def leaves(group, prefix: str = ""):
        for name, sub in group.commands.items():
            if hasattr(sub, "commands"):
                yield from leaves(sub, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}"
    missing = sorted(set(leaves(_cli())) - shown)
    assert not missing, f"CLI commands the README never shows: {missing}"


@per_doc
def test_standalone_settings_exist(doc: Path) -> None:
    """Spans such as `--set method.region=box`, `method.align_start=4`, `augment=dihedral`."""
    problems = []
    for span in _spans(doc.read_text()):
        if "causalign" in span or ".py" in span:
            continue  # whole commands: checked with their command
        for kv in re.findall(r"--set (\S+=\S*)", span):
            try:  # as the shell passes it: `--set class_weight='[1,4]'` (quoted for zsh)
                _check_set("".join(shlex.split(kv)), None, f"`{span}`")
            except Exception as exc:  # noqa: BLE001
                problems.append(str(exc))
        bare = re.fullmatch(r"(method\.)?([a-z_0-9]+)=(\S+)", span)
        # `create_graph=True`: a Python keyword argument, not a --set setting
        if bare and bare[3] not in ("True", "False", "None"):
            try:
                _check_set(f"method.{bare[2]}={bare[3]}" if bare[1] or bare[2] not in
                           _train_keys() else span, None, f"`{span}`")
            except Exception as exc:  # noqa: BLE001
                problems.append(str(exc))
    assert not problems, "\n".join(problems)


@cache
def _train_keys() -> frozenset[str]:
    from causalign.engine.config import valid_keys

    return frozenset(valid_keys())


def _script_options(script: Path) -> set[str]:
    """The options a benchmark script's argparse declares (read from its source, and from
    the sibling scripts it imports, e.g. a shared `parse_args`)."""
    src = script.read_text()
    for name in re.findall(r"^from (\w+) import", src, flags=re.M):
        sibling = script.parent / f"{name}.py"
        if sibling.is_file() and sibling != script:
            src += sibling.read_text()
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", src))


def benchmark_invocations(text: str) -> list[tuple[str, str, list[str]]]:
    """(command, script name, tokens after it) for `python benchmarks/X.py …` and
    `X.py --opt …` shown in the README."""
    out = []
    for cmd in readme_commands(text):
        toks = _tokens(cmd)
        for i, tok in enumerate(toks):
            m = re.fullmatch(r"(?:benchmarks/)?(\w+\.py)", tok)
            if m and (tok.startswith("benchmarks/") or
                      (i + 1 < len(toks) and toks[i + 1].startswith("--"))):
                if (ROOT / "src" / "causalign" / m[1]).exists() and not tok.startswith(
                        "benchmarks/"):
                    break  # a source file (cli.py …), not a script
                out.append((cmd, m[1], toks[i + 1:]))
                break
    return out


@per_doc
def test_every_benchmark_script_and_flag_exists(doc: Path) -> None:
    invocations = benchmark_invocations(doc.read_text())
    assert doc != README or len(invocations) >= 10  # the parser finds the README's
    problems = []
    for cmd, name, rest in invocations:
        script = ROOT / "benchmarks" / name
        if not script.is_file():
            problems.append(f"`{cmd}`: benchmarks/{name} does not exist")
            continue
        valid = _script_options(script) | {"--help"}
        problems += [f"`{cmd}`: benchmarks/{name} has no option {opt}"
                     for opt, _ in _option_values(rest) if opt not in valid]
    assert not problems, "\n".join(problems)


def test_make_targets_exist() -> None:
    text = README.read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {m for cmd in readme_commands(text) for m in re.findall(r"^make (\S+)", cmd)}
    assert shown and shown <= targets, f"unknown make targets: {shown - targets}"


def _expand(path: str) -> list[str]:
    """Brace alternatives, as the README writes result-file families: a.{json,md}."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not m:
        return [path]
    return list(itertools.chain.from_iterable(
        _expand(path[:m.start()] + alt + path[m.end():]) for alt in m[1].split(",")))


def cited_paths(text: str) -> list[str]:
    """Repository paths a document cites in spans and commands (from the repository root;
    its markdown links are `_links`)."""
    pattern = r"(?<![\w/.\-])((?:src|benchmarks|docs|tests|\.ci)/[^\s`)\]|;:'\"]*)"
    found: list[str] = []
    for chunk in [*_spans(text), *(ln for b in _fenced(text) for ln in _shell_lines(b))]:
        found += re.findall(pattern, chunk.replace("\\|", "|"))
    paths = []
    for p in found:
        p = p.rstrip(".,")
        if p.endswith("…"):
            continue
        paths += _expand(p)
    return paths


def _links(text: str) -> list[str]:
    """Targets of a document's markdown links and images inside the repository (relative to
    the document; web addresses and ../shared, which lies beside the checkout, left out)."""
    return [p for p in re.findall(r"\]\(([^)#\s]+)", _prose(text))
            if not p.startswith(("http", "../shared", "../../shared"))]


def _missing(paths: list[str], base: Path) -> list[str]:
    return [p for p in paths
            if p not in NOT_SHIPPED and not re.search(r"<|RUN|DIR|\{seed\}", p)
            and not glob.glob(str(base / p))]


@per_doc
def test_every_cited_path_exists(doc: Path) -> None:
    text = doc.read_text()
    paths = cited_paths(text)
    assert doc != README or len(paths) >= 40  # the parser finds the README's
    missing = _missing(paths, ROOT) + _missing(_links(text), doc.parent)
    assert not missing, f"{doc.name} cites paths that do not exist: {sorted(set(missing))}"


@per_doc
def test_cited_test_names_exist(doc: Path) -> None:
    problems = []
    for path, name in re.findall(r"(tests/test_\w+\.py)::(\w+)", doc.read_text()):
        src = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        if not re.search(rf"^\s*(async )?def {name}\(", src, re.M):
            problems.append(f"{path}::{name}")
    assert not problems, f"README cites tests that do not exist: {problems}"


def _slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens,
    -1, -2 … for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@per_doc
def test_every_anchor_resolves(doc: Path) -> None:
    text = doc.read_text()
    problems = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = (doc.parent / target).resolve() if target else doc
        if not linked.is_file():
            problems.append(f"{target}: no such file")
        elif anchor not in _slugs(linked.read_text()):
            problems.append(f"{target or doc.name}#{anchor}")
    assert not problems, f"{doc.name} links to headings that do not exist: {problems}"


def test_ppi_results_link_points_at_the_ppi_results() -> None:
    """The summary's "PPI results" link must land on PPI's section, not on the first
    "Results" heading (GitHub numbers repeated headings -1, -2 …)."""
    text = README.read_text()
    target = re.search(r"\[PPI results\]\(#([^)]+)\)", text)
    assert target, "the summary links PPI's results"
    heading = next(h for h in re.findall(r"^#{1,6} (.+)$", _prose(text), re.M)
                   if re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") == target[1])
    assert "PPI" in heading or "Pseudo" in heading, heading


def _readme_table(text: str, header_start: str) -> list[list[str]]:
    block = text[text.index(header_start):]
    rows = []
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _table1_runs(folder: str) -> dict[str, list[dict]]:
    """Finished runs of a stored Table 1 results.csv, by method, in seed order."""
    with open(ROOT / "benchmarks/results" / folder / "results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    by_method: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        by_method.setdefault(r["method"], []).append(r)
    return by_method


def test_table1_figures_equal_the_stored_results() -> None:
    """README Table 1 = mean (std, ddof 0) over seeds of the 2026-12-05 rerun's results.csv;
    a bracket holds the earlier table's mean (benchmarks/results/table1/), shown exactly
    where the two differ by more than 0.005."""
    runs, earlier = _table1_runs("table1_rerun_2026-12-05"), _table1_runs("table1")

    def mean(by_method: dict[str, list[dict]], method: str, col: str) -> float:
        return statistics.mean(float(r[col]) for r in by_method[method])

    def cell(method: str, col: str) -> str:
        v = [float(r[col]) for r in runs[method]]
        return f"{statistics.mean(v):.3f} ({statistics.pstdev(v):.3f})"

    table = _readme_table(README.read_text(), "| method | CAM precision | accuracy | AUC |")
    assert len(table) == len(runs) == len(earlier) == 9
    columns = ("test_cam_precision", "test_accuracy", "test_auc", "test_cam_mass_in_mask")
    for label, *cells, per_seed in table:
        method = re.search(r"`([a-z-]+)`", label)
        method = method[1] if method else {"ERM (no alignment)": "erm"}.get(
            label, "oracle" if label.startswith("Oracle") else label)
        for text, col in zip(cells, columns, strict=True):
            shown = re.fullmatch(r"(\S+ \(\S+\))(?: \[(\S+)\])?", text)
            assert shown, (label, text)
            assert shown[1] == cell(method, col), (label, col)
            before = mean(earlier, method, col)
            if shown[2] is None:
                assert abs(before - mean(runs, method, col)) <= 0.005, (label, col)
            else:
                assert shown[2] == f"{before:.3f}", (label, col)
        assert per_seed == " / ".join(f"{float(r['test_accuracy']):.3f}"
                                      for r in runs[method]), label


@pytest.mark.parametrize("suite", ["quick", "paper", "demo"])
def test_shipped_suites_exist(suite: str) -> None:
    """`causalign benchmark SUITE`: the README's shipped suite names load."""
    path = ROOT / "src" / "causalign" / "suites" / f"{suite}.yaml"
    assert yaml.safe_load(path.read_text())["name"] == suite


@per_doc
def test_every_train_command_names_its_run_folder(doc: Path) -> None:
    """`train` without --out writes runs/METHOD-seedS, and a finished run is never
    overwritten: the README's sweeps (one method and seed, other settings) would stop at
    their second run without --out."""
    bare = [cmd for cmd, toks in causalign_invocations(doc.read_text())
            if toks[:1] == ["train"] and len(toks) > 1 and "--out" not in toks]
    assert not bare, "train commands without --out:\n" + "\n".join(bare)


def test_layout_lists_real_files() -> None:
    """The Layout block: each file it names is in the folder it is listed under."""
    block = next(b for b in _fenced(README.read_text(), ("",)) if b.startswith("src/causalign/"))
    pkg = ROOT / "src" / "causalign"
    folder = pkg
    missing = []
    for line in block.splitlines()[1:]:
        head = re.match(r"^(\s{0,2})([\w.]+/)\s", line)
        if head:  # a new folder: `  data/ …` inside the package, `benchmarks/ …` at the root
            folder = (pkg if head[1] else ROOT) / head[2]
        text = line
        if "importers/ (" in text:  # importers/ (lidc, cbis_ddsm, …): module names
            names = re.search(r"importers/ \(([^)]*)\)", text)[1].split(",")
            missing += [f"importers/{n.strip()}.py" for n in names
                        if not (folder / "importers" / f"{n.strip()}.py").is_file()]
        for name in re.findall(r"(?<![\w/*])((?:\w+/)*\w+\.(?:py|yaml|md))", text):
            if not any(glob.glob(str(base / name)) for base in (folder, pkg, ROOT)):
                missing.append(f"{folder.relative_to(ROOT)}/{name}")
        for pattern in re.findall(r"(?<![\w/])(\w*\*\.py)", text):
            if not glob.glob(str(folder / pattern)):
                missing.append(f"{folder.relative_to(ROOT)}/{pattern}")
    assert not missing, f"Layout names files that do not exist: {missing}"


def _table_rows(text: str, header_start: str) -> dict[str, list[str]]:
    """Body rows of the markdown table whose header starts with header_start, keyed by the
    first cell; bold markers dropped."""
    rows = _readme_table(text, header_start)
    return {r[0]: [c.replace("**", "") for c in r[1:]] for r in rows}


# README table (header start) -> stored results table (file, header start, row-name aliases)
COPIED_TABLES = [
    ("| metric (test) | ERM | PPI (WBP) |", "ppi_vs_erm.md", "| metric | ERM | PPI |", {}),
    ("| metric | ERM | PPI |\n|---|---|---|\n| accuracy | 0.774", "ppi_vs_erm_none/ppi_vs_erm.md",
     "| metric | ERM | PPI |", {}),
    ("| saliency | 0.2 % (8 px)", "faithfulness.md", "| saliency |",
     {"random (baseline)": "random map"}),
    ("| No PPI | A |", "cross_site.md", "| No PPI | A |", {}),
    ("| +PPI | A |", "cross_site.md", "| +PPI | A |", {}),
    ("| AUC | ERM | PPI |", "cross_site_seeds.md", "| figure | ERM | PPI |",
     {"mean": "mean of the matrix", "in site mean": "in-site",
      "cross site mean": "cross-site", "gap in minus cross": "in − cross gap"}),
    ("| class_weight | accuracy |", "class_weight_imbalance.md", "| class_weight |", {}),
]


@pytest.mark.parametrize("readme_header,stored,stored_header,aliases", COPIED_TABLES,
                         ids=[t[1] + ":" + t[2] for t in COPIED_TABLES])
def test_copied_tables_equal_the_stored_results(readme_header: str, stored: str,
                                                stored_header: str, aliases: dict) -> None:
    ours = _table_rows(README.read_text(), readme_header)
    theirs = _table_rows((ROOT / "benchmarks" / "results" / stored).read_text(), stored_header)
    theirs = {aliases.get(k, k): v for k, v in theirs.items()}
    assert ours == theirs


def test_readme_suite_example_loads() -> None:
    """The Benchmark runner's YAML example is a valid suite: 2 datasets × 2 methods × 3 seeds."""
    from causalign.engine.benchmark import parse_suite, plan

    (block,) = _fenced(README.read_text(), ("yaml",))
    runs = plan(parse_suite(yaml.safe_load(block), ROOT, "mine"))
    assert len(runs) == 12
    assert {r.label for r in runs} == {"erm", "Ross et al. (2017)"}
