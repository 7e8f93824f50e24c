"""The examples each command's ``--help`` shows, declared once.

The command line's epilogs (``ckptavg COMMAND --help``) and the documentation's command pages
are both made from :data:`EXAMPLES`; ``tests/test_docs.py`` runs every one of them against the
small training run of ``docs/examples/make_runs.py`` (``runs/``, ``bn.toml``), so an example
that stops working fails the tests. Nothing here imports torch: ``--help`` stays fast.

Example::

    from ckptavg.help_examples import EXAMPLES, epilog

    for line, what in EXAMPLES["merge"]:
        print(line, "#", what)
    print(epilog("merge"))
"""

from __future__ import annotations

__all__ = ["EXAMPLES", "epilog"]

# command -> [(command line, what it does)], in the order a user meets them; the commands run in
# this order in the tests (bn recalibrates the swa.pt that merge's first example writes).
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "merge": [
        ("ckptavg merge runs/ -o swa.pt", "uniform average (SWA) of every checkpoint in runs/"),
        ("ckptavg merge runs/ -o ema.safetensors --epochs 2: --method ema --decay 0.9",
         "EMA (decay 0.9 per checkpoint) of epochs 2 and later"),
        ("ckptavg merge runs/ -o best3.pt --best 3 --metric val_loss --lower-is-better --dry-run",
         "the plan for the 3 best by a stored metric; reads no tensor data"),
    ],
    "inspect": [
        ("ckptavg inspect runs/", "one row per checkpoint (format, epoch, step, metrics...), then the differences"),
        ("ckptavg inspect runs/ --json", "the same as JSON"),
    ],
    "bn": [
        ("ckptavg bn swa.pt --spec bn.toml -o swa_bn.pt", "recompute BatchNorm statistics over the spec's data"),
        ("ckptavg bn swa.pt --spec bn.toml -o swa_bn.safetensors --mode torch --max-batches 2",
         "as torch.optim.swa_utils.update_bn does, over at most 2 batches"),
    ],
    "sweep": [
        ("ckptavg sweep runs/ --spec bn.toml -o best.pt", "windows of the 2, 4, ... newest and all; write the best"),
        ("ckptavg sweep runs/ --spec bn.toml --last 2,4 --method uniform,ema --decay 0.5,0.9 --json",
         "uniform and two EMAs over two windows; the table as JSON"),
    ],
    "soup": [
        ("ckptavg soup runs/ --spec bn.toml -o soup.pt", "greedy soup of every checkpoint"),
        ("ckptavg soup runs/ --spec bn.toml --epochs 2: --best 3 --metric val_loss --lower-is-better",
         "ingredients: the 3 best of epochs 2 and later by their stored val_loss"),
    ],
    "watch": [
        ("ckptavg watch runs/ -o live.pt --last 3 --once",
         "one update of the average of the 3 newest complete checkpoints, then exit (cron, a pipeline step)"),
        ("ckptavg watch runs/ -o live_ema.safetensors --method ema --decay 0.9 --once --json",
         "the same for an EMA, with one JSON line per event on stdout"),
    ],
}


def epilog(command: str | None = None) -> str:
    """The examples block of ``ckptavg COMMAND --help`` (or of ``ckptavg --help``: the first
    example of every command), formatted for click (``\\b`` keeps the lines as they are)."""
    if command is None:
        pairs = [examples[0] for examples in EXAMPLES.values()]
    else:
        pairs = EXAMPLES[command]
    lines = ["Examples:", "", "\b"]
    for line, what in pairs:
        lines.append(f"  {line}")
        lines.append(f"      {what}")
    return "\n".join(lines)
