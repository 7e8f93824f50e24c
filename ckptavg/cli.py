"""The ``ckptavg`` command line: a thin click layer over :mod:`ckptavg.api`.

Errors a user can cause are printed as one line (``ckptavg: error: ...``) without a
traceback; the exit status is 1, or 2 for usage errors. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings
from typing import Any

import click

from ._version import __version__
from .errors import CkptavgError, CkptavgWarning
from .help_examples import epilog
from .options import BN_MODES, ORDERS, click_options

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup (removing temporary files) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    dist = sys.modules.get("ckptavg.distributed")
    if dist is not None and dist.failing():
        return  # a merge across ranks failed and is exiting: print its error (torchrun stops the other ranks)
    raise _Terminated()


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    if issubclass(category, CkptavgWarning):
        click.echo(f"ckptavg: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


class _Group(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """As click's, but a usage error (an unknown or mistyped option, a bad value) is one line,
        ``ckptavg: error: ...`` with exit status 2, like every other error."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _ARGV[:] = list(sys.argv[1:] if args is None else args)
        _JSON_PRINTED[0] = False
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "ckptavg"
            click.echo(f"ckptavg: error: {e.format_message()} (see '{where} --help')", err=True)
            if e.ctx is not None and e.ctx.parent is not None:
                _json_error(e.ctx.command.name, e.format_message(), e.exit_code)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"ckptavg: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("ckptavg: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug is accepted after the subcommand too (ckptavg merge ... --debug)
        if "--debug" in args:
            end = args.index("--") if "--" in args else len(args)
            if "--debug" in args[:end]:
                args = ["--debug"] + [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("CKPTAVG_DEBUG") == "1"
        mark = len(_published())
        try:
            return super().invoke(ctx)
        except CkptavgError as e:
            if debug:
                raise
            if not getattr(e, "ckptavg_quiet", False):  # a merge across ranks: another rank prints it
                click.echo(f"ckptavg: error: {e}", err=True)
                _json_error(ctx.invoked_subcommand, str(e), e.exit_code)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo(f"ckptavg: interrupted; {_written(mark)}", err=True)
            ctx.exit(130)
        except _Terminated:
            if debug:
                raise
            click.echo(f"ckptavg: terminated; {_written(mark)}", err=True)
            ctx.exit(143)


_ARGV: list[str] = []  # the arguments of this run, for the --json error document
_JSON_PRINTED: list[bool] = [False]  # a document is already on stdout (inspect's report before its exit 1)


def _json_error(command: str | None, message: str, code: int) -> None:
    """With --json, a failed command still prints one JSON document on stdout (its error); for
    ``watch``, whose stdout is JSON lines, one ``error`` event."""
    args = _ARGV[: _ARGV.index("--")] if "--" in _ARGV else _ARGV
    if "--json" in args and command and not _JSON_PRINTED[0]:
        from .events import dumps, error_document, event

        if command == "watch":
            click.echo(dumps(event("error", message=message, exit_code=code, path=None)))
        else:
            click.echo(dumps(error_document(command, message, code), indent=2))


def _published() -> list[Any]:
    """Outputs this process has renamed into place (none if no output module was ever loaded:
    importing it here would import torch)."""
    files = sys.modules.get("ckptavg.io.files")
    return files.PUBLISHED if files is not None else []


def _written(mark: int) -> str:
    """What an interrupted command leaves: the outputs it had already completed, else nothing."""
    done = _published()[mark:]
    if not done:
        return "nothing was written"
    return f"already complete before the interrupt: {', '.join(map(str, done))}; nothing else was written"


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _storage(command: Any) -> Any:
    """The ``--storage-options`` of every command that reads or writes paths (which may be URLs)."""
    @functools.wraps(command)
    def run(*args: Any, storage_options: str | None = None, **kwargs: Any) -> Any:
        from .io.urls import configure

        configure(storage_options)
        return command(*args, **kwargs)

    return click.option("--storage-options", metavar="JSON",
                        help="For URL inputs/outputs (s3://, gs://, ...): options for the fsspec backend as a JSON "
                             "object, e.g. '{\"anon\": true}'; credentials otherwise come from the backend's usual "
                             "configuration (AWS_* variables, profiles). Never printed.")(run)


@click.group(cls=_Group, context_settings=CONTEXT, epilog=epilog())
@click.version_option(__version__, "-V", "--version", prog_name="ckptavg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Average PyTorch checkpoints (SWA, EMA, selections), streaming, and recalibrate BatchNorm."""


@cli.command(context_settings=CONTEXT, epilog=epilog("merge"))
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINTS...")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output: .safetensors; .pt, .pth, .bin, .ckpt, .pth.tar or .tar for a torch file; or a folder "
                   "(DIR/, an existing folder, or a name without extension) for Hugging Face sharded safetensors; "
                   "NAME.dcp for a PyTorch DCP folder; a template such as 'ema-{decay}.pt' for several outputs.")
@click_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan/report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@_storage
def merge(inputs: tuple[str, ...], output: str, quiet: bool, as_json: bool, strip_prefix: tuple[str, ...],
          **opts: Any) -> None:
    """Average CHECKPOINTS (files, globs or folders) into one model file.

    Floating tensors are averaged in float32 (float64 for 16-bit and float64 inputs, or
    with --accumulate float64) and cast once to the output dtype; integer and bool tensors
    (e.g. num_batches_tracked) come from the last selected checkpoint. Checkpoints are
    loaded with weights_only=True. Several values of a sweepable option write several
    outputs from one pass: -o 'ema-{decay}.pt' --method ema --decay 0.5,0.9.
    """
    from . import api

    report = api.merge(list(inputs), output, progress=_progress(quiet), strip_prefix=list(strip_prefix) or None,
                       **opts)
    if report.extra.get("rank", 0) != 0:
        return  # a merge across ranks (torchrun): rank 0 reports
    if as_json:
        _echo_json("merge", report.to_dict())
    elif report.dry_run:
        click.echo(report.plan.format())
    else:
        for note in report.plan.notes:
            click.echo(f"ckptavg: note: {note}", err=True)
        if not quiet:
            click.echo(report.summary(), err=True)


@cli.command(context_settings=CONTEXT, epilog=epilog("bn"))
@click.argument("model_file", metavar="MODEL")
@click.option("--spec", "spec", required=True, type=click.Path(dir_okay=False),
              help="BN spec (TOML): model factory, data, device.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file: .safetensors, or .pt/.pth for a torch state dict.")
@click.option("--mode", type=click.Choice(BN_MODES), default="precise", show_default=True,
              help="precise: exact population statistics; torch: what torch.optim.swa_utils.update_bn does.")
@click.option("--device", help="Device for the data pass (overrides the spec's [run].device).")
@click.option("--max-batches", type=int, metavar="N", help="Use at most N batches (overrides the spec).")
@click.option("--key", metavar="PATH", help="Where the weights are inside a torch checkpoint (dotted).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full unpickling (can run code from the file!) if weights_only refuses it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@_storage
def bn(model_file: str, spec: str, output: str, mode: str, device: str | None, max_batches: int | None,
       key: str | None, trust_pickle: bool, quiet: bool, as_json: bool) -> None:
    """Recalibrate the BatchNorm statistics of MODEL (a model file) with a spec's data.

    Only running_mean, running_var and num_batches_tracked change; every other tensor is
    bit-identical and key names are kept. The spec imports and runs your model and data
    code (that is its purpose).
    """
    from . import api

    report = api.recalibrate_file(model_file, spec, output, mode=mode, device=device, max_batches=max_batches,
                                  key=key, trust_pickle=trust_pickle, progress=_progress(quiet))
    if as_json:
        _echo_json("bn", report.to_dict())
    if not quiet:
        click.echo(report.summary(), err=True)


@cli.command("inspect", context_settings=CONTEXT, epilog=epilog("inspect"))
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINTS...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--key", metavar="PATH", help="Where the weights are inside a torch checkpoint (dotted, e.g. model_ema).")
@click.option("--strip-prefix", multiple=True, metavar="P", help="Remove prefix P from tensor names (repeatable).")
@click.option("--order", type=click.Choice(ORDERS), default="auto",
              show_default=True, help="Row order; auto: the training order merge uses.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full unpickling (can run code from the file!) for checkpoints weights_only refuses.")
@_storage
def inspect_cmd(inputs: tuple[str, ...], as_json: bool, key: str | None, strip_prefix: tuple[str, ...], order: str,
                trust_pickle: bool) -> None:
    """Describe CHECKPOINTS (files, globs or folders) and how they differ, reading headers only.

    One row per checkpoint: file, format, where the weights were found, epoch, step,
    tensor and parameter counts, dtypes, size and stored metrics; then the differences
    (missing tensor names, shape or dtype differences). Exit status 1 if a checkpoint
    cannot be read.
    """
    from .errors import CheckpointReadError
    from .inspection import inspect as do_inspect

    report = do_inspect(list(inputs), key=key, strip_prefix=list(strip_prefix) or None, trust_pickle=trust_pickle,
                        order=order)
    if as_json:
        _echo_json("inspect", report.to_dict())
    else:
        click.echo(report.format())
    if report.errors:
        bad = report.errors[0]
        more = f" (and {len(report.errors) - 1} more unreadable)" if len(report.errors) > 1 else ""
        raise CheckpointReadError(f"{bad.error}{more}")


def _eval_options(command: Any) -> Any:
    """The options sweep and soup share (spec, output, device, memory bound, plot, output format)."""
    for decorator in reversed([
        click.option("--spec", "spec", required=True, type=click.Path(dir_okay=False),
                     help="Spec (TOML) with [model], [data] (for BatchNorm) and [eval] (held-out loader, metric)."),
        click.option("-o", "--output", type=click.Path(),
                     help="Write the chosen model here (any output of merge: .safetensors, .pt, DIR/...)."),
        click.option("--device", help="Device for evaluation and BN recalibration (overrides [run].device)."),
        click.option("--max-memory", default="8GB", show_default=True, metavar="SIZE",
                     help="Refuse when one copy of the model exceeds SIZE (averages are held in memory)."),
        click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
                     help="Plot the scores into a PNG (needs matplotlib: pip install 'ckptavg[plot]')."),
        click.option("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes."),
    ]):
        command = decorator(command)
    return command


_FIXED = ["order", "every", "key", "strip_prefix", "trust_pickle", "allow_nonfinite", "accumulate", "buffers",
          "dtype", "bn_mode"]


def _echo_json(command: str, payload: dict[str, Any]) -> None:
    from .events import document, dumps

    click.echo(dumps(document(command, payload), indent=2))
    _JSON_PRINTED[0] = True


def _echo_report(report: Any, as_json: bool, quiet: bool, notes: list[str], command: str = "sweep") -> None:
    if not quiet:
        for note in notes:
            click.echo(f"ckptavg: note: {note}", err=True)
    if as_json:
        _echo_json(command, report.to_dict())
    else:
        click.echo(report.format())


@cli.command("sweep", context_settings=CONTEXT, epilog=epilog("sweep"))
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINTS...")
@_eval_options
@click.option("--last", metavar="N[,N...]", help="Windows: the N newest checkpoints, per value (e.g. 2,4,8,16).")
@click.option("--epochs", metavar="A:B[,A:B...]", help="Windows: epoch ranges, per value (e.g. 10:,20:,30:).")
@click.option("--steps", metavar="A:B[,A:B...]", help="Windows: step ranges, per value (e.g. 5000:,8000:).")
@click.option("--method", metavar="M[,M...]", help="Methods to try: uniform, ema, power-ema (default uniform, plus "
              "ema/power-ema when --decay/--sigma-rel are given).")
@click.option("--decay", metavar="D[,D...]", help="EMA decays per checkpoint to try (with ema).")
@click.option("--sigma-rel", metavar="S[,S...]", help="Power-EMA widths to try (with power-ema).")
@click_options(only=_FIXED)
@_storage
def sweep_cmd(inputs: tuple[str, ...], strip_prefix: tuple[str, ...], as_json: bool, quiet: bool, **opts: Any) -> None:
    """Evaluate candidate averages of CHECKPOINTS with the spec's [eval] metric; write the best.

    Candidates: every combination of a window (--last x --epochs x --steps; default the 2, 4,
    8, ... newest and all) and a method (uniform; ema per --decay; power-ema per --sigma-rel),
    plus the last and the best single checkpoint as baselines (scored as saved). Averages are
    computed in memory and BatchNorm-recalibrated with [data] when the model has BatchNorm.
    Ties go to the earlier row: an average must beat the baselines strictly.
    """
    from .sweeps import sweep

    report = sweep(list(inputs), opts.pop("spec"), opts.pop("output"), progress=_progress(quiet),
                   strip_prefix=list(strip_prefix) or None, **opts)
    _echo_report(report, as_json, quiet, report.notes)


@cli.command("soup", context_settings=CONTEXT, epilog=epilog("soup"))
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINTS...")
@_eval_options
@click_options(only=["epochs", "steps", "last", "best", "metric", "lower_is_better", *_FIXED])
@_storage
def soup_cmd(inputs: tuple[str, ...], strip_prefix: tuple[str, ...], as_json: bool, quiet: bool, **opts: Any) -> None:
    """Greedy soup of CHECKPOINTS (after the selection options) with the spec's [eval] metric.

    Ingredients are tried in order of their own score, best first (ties: the earlier
    checkpoint); the soup starts as the best one and takes each next one if the uniform
    average with it scores at least as well. The uniform soup of all ingredients is reported
    beside it. Averages are BatchNorm-recalibrated with [data] when the model has BatchNorm.
    """
    from .sweeps import soup

    report = soup(list(inputs), opts.pop("spec"), opts.pop("output"), progress=_progress(quiet),
                  strip_prefix=list(strip_prefix) or None, **opts)
    _echo_report(report, as_json, quiet, [], "soup")


@cli.command("watch", context_settings=CONTEXT, epilog=epilog("watch"))
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINTS...")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output, as for merge (a file, DIR/, NAME.dcp, or a template such as 'ema-{sigma_rel}.pt').")
@click_options
@click.option("--once", is_flag=True, help="One update if one is due, then exit (0 also when nothing changed).")
@click.option("--every-new", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Re-average only after K new or changed complete checkpoints.")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="At most one update per SECONDS; also the time between scans when polling "
              "(with inotify a change wakes the watcher sooner).")
@click.option("--settle", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="SECONDS",
              help="A checkpoint is used once its size and times stayed unchanged this long (and its format "
                   "says it is complete).")
@click.option("--prune", is_flag=True, help="Delete checkpoints matched by CHECKPOINTS that can no longer enter "
              "the selection (older than the oldest selected; with --last, --best, --steps/--epochs A:). Never "
              "by default.")
@click.option("--poll", is_flag=True, help="Poll even where inotify is available.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per event on stdout (schema: docs/pipelines.md).")
@click.option("-q", "--quiet", is_flag=True, help="No event lines on stderr.")
@_storage
def watch_cmd(inputs: tuple[str, ...], output: str, strip_prefix: tuple[str, ...], once: bool, every_new: int,
              interval: float, settle: float, prune: bool, poll: bool, as_json: bool, quiet: bool,
              **opts: Any) -> None:
    """Keep OUTPUT equal to `merge CHECKPOINTS -o OUTPUT [options]` over the checkpoints complete so far.

    \b
    Examples:
      ckptavg watch runs/ -o swa.safetensors --last 5
      ckptavg watch ckpt/ -o ema.pt --method ema --decay-per-step 0.9999 --json
      ckptavg watch runs/ -o swa.pt --steps 20000: --once        # from cron
      ckptavg watch snaps/ --method power-ema --sigma-rel 0.05,0.1 -o 'ema-{sigma_rel}.safetensors'

    A checkpoint is used once complete (its format's end mark: safetensors length, the zip's
    end record, an HF index and all shards, DCP .metadata, trainer_state.json, Megatron's
    marker) and unchanged for --settle seconds. Each update is a full merge of the selection,
    published atomically: OUTPUT is byte for byte what `ckptavg merge` writes. SIGINT or
    SIGTERM stops it (exit status 0), abandoning an update in progress.
    """
    from .events import describe, dumps, event
    from .watcher import watch

    updates = [0]

    def on_event(ev: dict[str, Any]) -> None:
        updates[0] += ev["event"] == "published"
        if as_json:
            click.echo(dumps(ev))
            sys.stdout.flush()
            _JSON_PRINTED[0] |= ev["event"] == "error"  # a fatal error after it is not printed twice
        elif not quiet:
            click.echo(f"ckptavg: watch: {describe(ev)}", err=True)

    from . import distributed

    stop = _signal_stop() if distributed.active(opts.get("distributed")) else None
    try:
        result = watch(list(inputs), output, once=once, every_new=every_new, interval=interval, settle=settle,
                       prune=prune, poll=poll, on_event=on_event, stop=stop,
                       strip_prefix=list(strip_prefix) or None, **opts)
    except (KeyboardInterrupt, _Terminated):
        on_event(event("stopped", reason="signal", updates=updates[0]))  # a requested stop is success
        return
    if once and result.errors:
        click.get_current_context().exit(1)  # the update failed (its error event says why)


def _signal_stop() -> Any:
    """A stop flag that SIGINT and SIGTERM set (a watch across ranks: a signal must never raise in
    the middle of a collective; the ranks stop together at their next meeting)."""
    import threading

    class _Stop(threading.Event):
        reason = "signal"

    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.set())
    return stop


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    warnings.showwarning = _show_warning
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not in the main thread
        pass
    try:
        cli.main(args=argv, prog_name="ckptavg")
    except SystemExit as e:
        dist = sys.modules.get("ckptavg.distributed")
        if dist is not None and (dist.failing() or (dist.joined() and not e.code)):
            # A merge across ranks failed and every rank knows it. Exit at once: during the interpreter's
            # teardown SIGTERM has its default effect again, and torchrun sends it to every rank as soon
            # as one exits, which would turn this rank's exit status 1 into "killed by SIGTERM". After a
            # success under torchrun the output is published and the group left: nothing remains to run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
