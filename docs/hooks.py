"""mkdocs hooks: what the documentation generates from the code at build time.

* ``<!-- options: COMMAND -->`` becomes the table of that command's options, walked from the
  click command itself (``ckptavg/options.py`` + the decorators in ``ckptavg/cli.py``), so the
  table and ``--help`` cannot disagree.
* ``<!-- examples: COMMAND -->`` becomes the command's examples from ``ckptavg.help_examples``
  (the epilog ``--help`` shows).
* The benchmark plots (``img/bench_*.png``) are drawn from ``docs/data/benchmarks.json`` and the
  digits example's plots are taken from ``examples/digits/`` (see gen_plots.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402
import gen_plots  # noqa: E402

from ckptavg.cli import cli  # noqa: E402
from ckptavg.help_examples import EXAMPLES  # noqa: E402

_MARK = re.compile(r"<!-- (options|examples): ([a-z]+) -->")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def options_table(command: str) -> str:
    """The markdown table of ``ckptavg COMMAND``'s options, from the click command."""
    cmd = cli.commands[command]
    ctx = click.Context(cmd, info_name=command)
    rows = ["| option | value | default | what it does |", "| --- | --- | --- | --- |"]
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or p.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        value = "" if p.is_flag else f"`{_cell(p.make_metavar(ctx))}`"
        default = ""
        if p.show_default and p.default is not None and not p.is_flag:
            default = f"`{p.default}`"
        rows.append(f"| {names} | {value} | {default} | {_cell(p.help or '')} |")
    return "\n".join(rows)


def examples_block(command: str) -> str:
    lines = ["```bash"]
    for line, what in EXAMPLES[command]:
        lines += [f"# {what}", line]
    return "\n".join(lines + ["```"])


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def sub(m: re.Match[str]) -> str:
        kind, command = m.groups()
        return options_table(command) if kind == "options" else examples_block(command)

    return _MARK.sub(sub, markdown)


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for name, data in gen_plots.images().items():
        files.append(File.generated(config, f"img/{name}", content=data))
        files.append(File.generated(config, f"commands/img/{name}", content=data))
    return files
