"""The documentation cannot drift from the code: every runnable command-line example runs.

Blocks in ``docs/**/*.md`` preceded by ``<!-- runnable -->`` are run in a temporary folder holding
the small run ``docs/examples/make_runs.py`` makes (``runs/``, ``model.py``, ``bn.toml``), page by
page in nav order; ``console`` blocks compare the stdout shown under each ``$ command`` exactly;
``bash`` blocks only have to succeed. Every ``--help`` example (``ckptavg.help_examples``) runs too,
and the option tables the docs generate list exactly the options ``--help`` offers. ``ckptavg``
commands run in this process through click (one torch import for all), ``python`` ones in a
subprocess.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli
from ckptavg.help_examples import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- runnable -->\n```(console|bash)\n(.*?)\n```", re.S)


def _nav_pages() -> list[Path]:
    text = (ROOT / "mkdocs.yml").read_text()
    return [DOCS / p for p in re.findall(r":\s*(\S+\.md)\s*$", text[text.index("\nnav:"):], flags=re.M)]


def runnable_blocks() -> list[tuple[str, str, str]]:
    """(page, kind, body) of every runnable block, in nav order."""
    out = []
    for page in _nav_pages():
        for kind, body in BLOCK.findall(page.read_text()):
            out.append((page.relative_to(ROOT).as_posix(), kind, body))
    return out


def _run(line: str, cwd: Path) -> tuple[int, str]:
    args = shlex.split(line)
    if args[0] == "ckptavg":
        result = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        return result.exit_code, result.stdout
    if args[0] == "python":
        if args[1] == "make_runs.py":
            args[1] = str(DOCS / "examples" / "make_runs.py")
        p = subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout
    raise AssertionError(f"a runnable example may run ckptavg or python only: {line}")


def _commands(kind: str, body: str) -> list[tuple[str, str | None]]:
    """(command, expected stdout or None) pairs of a block."""
    if kind == "bash":
        lines = [x.split(" #")[0].strip() for x in body.splitlines()]
        return [(x, None) for x in lines if x and not x.startswith("#")]
    pairs: list[tuple[str, str | None]] = []
    for chunk in ("\n" + body).split("\n$ ")[1:]:
        cmd, _, shown = chunk.partition("\n")
        pairs.append((cmd, shown))
    return pairs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(DOCS / "examples" / "make_runs.py")], cwd=d, check=True, timeout=120)
    return d


def test_docs_have_runnable_examples() -> None:
    pages = {page for page, _, _ in runnable_blocks()}
    assert {"docs/getting-started.md", "docs/commands/merge.md", "docs/commands/inspect.md"} <= pages


def test_runnable_examples_run_and_print_what_the_docs_show(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    ran = 0
    for page, kind, body in runnable_blocks():
        for cmd, shown in _commands(kind, body):
            code, out = _run(cmd, workdir)
            assert code == 0, f"{page}: `{cmd}` exited {code}"
            if shown is not None:
                assert out.rstrip("\n") == shown.rstrip("\n"), f"{page}: `{cmd}` printed\n{out}"
            ran += 1
    assert ran >= 6


def test_help_examples_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    for command in ("merge", "inspect", "bn", "sweep", "soup", "watch"):
        assert 2 <= len(EXAMPLES[command]) <= 3
        for line, _ in EXAMPLES[command]:
            code, _ = _run(line, workdir)
            assert code == 0, f"--help example `{line}` exited {code}"
    assert (workdir / "swa_bn.pt").is_file() and (workdir / "best.pt").is_file() and (workdir / "soup.pt").is_file()


def test_help_shows_the_declared_examples() -> None:
    for command, examples in EXAMPLES.items():
        out = CliRunner().invoke(cli, [command, "--help"]).stdout
        flat = " ".join(out.split())
        for line, what in examples:
            assert line in flat and " ".join(what.split()) in flat, (command, line)


def test_option_tables_list_what_help_offers() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    for command in EXAMPLES:
        table = hooks.options_table(command)
        out = CliRunner().invoke(cli, [command, "--help"]).stdout
        offered = set(re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", out, flags=re.M)) - {"--help"}
        listed = set(re.findall(r"`(--[a-z-]+)`", table)) - {"--help"}
        assert listed == offered, command
        page = (DOCS / "commands" / f"{command}.md").read_text()
        assert f"<!-- options: {command} -->" in page and f"<!-- examples: {command} -->" in page


def test_readme_links_into_the_docs_exist() -> None:
    slugify = pytest.importorskip("markdown.extensions.toc").slugify

    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+\.md)(?:#([^)]+))?\)", readme)
    assert len(links) >= 10
    for path, anchor in links:
        page = ROOT / path
        assert page.is_file(), path
        if anchor:
            slugs = {slugify(h, "-") for h in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)}
            assert anchor in slugs, f"{path}#{anchor}"
