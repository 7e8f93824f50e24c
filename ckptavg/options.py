"""The merge options, declared once.

:class:`MergeOptions` is the one list of what ``merge`` can be told. Each field carries its
default, help text, an example and how it appears on the command line; the Python API's
signatures (:func:`api_signature`), the plan, the click CLI (:func:`click_options`) and the
README's option table all derive from it. To add an option, add a field here: the API
accepts it, ``ckptavg merge --help`` lists it, and a test checks that the README documents it.

Scopes: ``plan`` options decide what is averaged and how (every averaging entry point takes
them); ``output`` options only make sense when writing a file (``merge``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

__all__ = ["MergeOptions", "option_fields", "api_signature", "click_options", "collect", "expand_variants",
           "single_values"]

METHODS = ("uniform", "ema", "power-ema")
ORDERS = ("auto", "given", "step", "epoch", "name")
DTYPES = ("float32", "float16", "bfloat16", "float64")
BN_MODES = ("precise", "torch")
BUFFERS = ("average", "last")
SCHEDULES = ("linear", "minus-sqrt", "linear__reverse", "minus-sqrt__reverse")  # ckptavg.weights.SCHEDULES


def _opt(default: Any, help: str, *, example: str = "", scope: str = "plan", cli_type: Any = None,
         choices: Sequence[str] | None = None, metavar: str | None = None, multiple: bool = False,
         cli: bool = True, sweep: bool = False) -> Any:
    return field(default=default, metadata={
        "help": help, "example": example, "scope": scope, "cli_type": cli_type, "choices": choices,
        "metavar": metavar, "multiple": multiple, "cli": cli, "sweep": sweep,
    })


@dataclass
class MergeOptions:
    """Every option of ``merge``/``average``/``plan`` (the CLI's ``ckptavg merge`` flags, one to one)."""

    # -- method (each is a weight vector over the selected checkpoints)
    method: str = _opt("uniform", "Averaging method (each is a weight vector over the checkpoints).",
                       example="--method ema --decay 0.9", choices=METHODS, sweep=True)
    decay: float | None = _opt(None, "EMA decay per checkpoint (with --method ema).",
                               example="--method ema --decay 0.9", cli_type=float, sweep=True)
    decay_per_step: float | None = _opt(None, "EMA decay per training step; uses the step gaps between checkpoints "
                                        "(with --method ema).", example="--method ema --decay-per-step 0.9999",
                                        cli_type=float, sweep=True)
    weights: Sequence[float] | str | None = _opt(None, "Explicit weights, comma separated, in checkpoint order, "
                                                 "applied as given: unnormalised or negative weights are allowed "
                                                 "(task arithmetic), with a warning when they do not sum to 1.",
                                                 example="--weights 0.5,0.3,0.2, --weights 1,-1,1")
    normalize: bool = _opt(False, "Divide --weights by their sum.", example="--weights 5,3,2 --normalize")
    schedule: str | None = _opt(None, "Warmup-stable-merge weights over the selected checkpoints, as Megatron-LM's "
                                "weighted_merge.py range mode: linear (uniform) or minus-sqrt (early checkpoints "
                                "weigh most); NAME__reverse reverses them.",
                                example="--steps 20000:30000 --schedule minus-sqrt", choices=SCHEDULES, sweep=True)
    gamma: float | None = _opt(None, "Power-EMA exponent (with --method power-ema).",
                               example="--method power-ema --gamma 6.94", cli_type=float, sweep=True)
    sigma_rel: float | None = _opt(None, "Power-EMA relative width, instead of --gamma (e.g. 0.05).",
                                   example="--method power-ema --sigma-rel 0.05", cli_type=float, sweep=True)
    at: int | None = _opt(None, "Post-hoc EMA from power-EMA snapshots: the step to reconstruct (a snapshot's "
                          "step; default the last).", example="--method power-ema --sigma-rel 0.07 --at 40000",
                          cli_type=int, metavar="STEP", sweep=True)
    snapshot_sigma_rels: Sequence[float] | str | None = _opt(
        None, "The sigma_rels an ema-pytorch PostHocEMA was built with, in order: its snapshots <index>.<step>.pt "
        "record none (or write them to ckptavg-snapshots.json beside them).",
        example="--method power-ema --sigma-rel 0.15 --snapshot-sigma-rels 0.05,0.28", metavar="S1,S2")
    # -- selection
    epochs: Any = _opt(None, "Keep checkpoints with epoch in A..B (inclusive; A: or :B open).",
                       example="--epochs 12:20, --epochs 150:", metavar="A:B", sweep=True)
    steps: Any = _opt(None, "Keep checkpoints with step in A..B (inclusive; A: or :B open).",
                      example="--steps 20000:", metavar="A:B", sweep=True)
    last: int | None = _opt(None, "Keep the N newest checkpoints.", example="--last 5", cli_type=int, metavar="N",
                            sweep=True)
    every: int | None = _opt(None, "Keep every K-th checkpoint, counted back from the newest.", example="--every 2",
                             cli_type=int, metavar="K", sweep=True)
    best: int | None = _opt(None, "Keep the N best by --metric (ties: the earliest wins).",
                            example="--best 3 --metric val_acc", cli_type=int, metavar="N")
    metric: str | None = _opt(None, "Scalar stored in the checkpoints (top level or in 'metrics').",
                              example="--best 3 --metric val_acc", metavar="NAME")
    lower_is_better: bool = _opt(False, "For --best: lower metric values are better (losses).",
                                 example="--best 3 --metric val_loss --lower-is-better")
    order: str = _opt("auto", "How to order checkpoints; auto: recorded step, epoch, then file names.",
                      example="--order given", choices=ORDERS)
    # -- reading
    key: str | None = _opt(None, "Where the weights are inside a torch checkpoint (dotted, e.g. model_ema).",
                           example="--key model_ema, --key ema.model", metavar="PATH")
    strip_prefix: str | Sequence[str] | None = _opt(None, "Remove prefix P from tensor names (repeatable).",
                                                    example="--strip-prefix module.", metavar="P", multiple=True)
    trust_pickle: bool = _opt(False, "Allow full unpickling (can run code from the file!) for checkpoints "
                              "weights_only refuses.", example="--trust-pickle")
    # -- numerics
    dtype: str | None = _opt(None, "Output dtype of floating tensors (default: as in the inputs).",
                             example="--dtype bfloat16", choices=DTYPES)
    accumulate: str = _opt("float32", "Accumulator precision.", example="--accumulate float64",
                           choices=("float32", "float64"))
    buffers: str = _opt("average", "Floating buffers (BatchNorm statistics...): average them, or take the last "
                        "checkpoint's (torch's AveragedModel(use_buffers=False)).", example="--buffers last",
                        choices=BUFFERS)
    allow_nonfinite: bool = _opt(False, "Average even if an input holds NaN or Inf.", example="--allow-nonfinite")
    allow_ill_conditioned: bool = _opt(False, "Post-hoc EMA from snapshots: proceed even when the weights amplify "
                                       "the snapshots' rounding errors more than 100 times (sum of |weights|).",
                                       example="--allow-ill-conditioned")
    lora_rank: int | None = _opt(None, "PEFT adapter folders: factor the exact average (an adapter of rank sum of the "
                                 "inputs' ranks) back to this rank by a truncated SVD; the report gives the relative "
                                 "error.", example="--lora-rank 16", cli_type=int, metavar="R")
    lora_merge_into: str | None = _opt(None, "PEFT adapter folders: add the exact average's update to this base model "
                                       "(a file or model folder) and write full weights, as PEFT's "
                                       "merge_and_unload() would.", example="--lora-merge-into base/ -o merged/",
                                       scope="output", metavar="BASE")
    lora_factors: bool = _opt(False, "Average LoRA factors (lora_A/lora_B, lora_down/lora_up) element by element, "
                              "as an EMA of one run's adapter does; refused otherwise, since it is not the average "
                              "of the adapters' updates.", example="--lora-factors")
    device: str = _opt("cpu", "cpu, cuda or cuda:N.", example="--device cuda")
    # -- output
    bn_spec: str | None = _opt(None, "Recalibrate BatchNorm statistics with this spec (TOML) before writing.",
                               example="--bn-spec bn.toml", scope="output", metavar="FILE")
    bn_mode: str = _opt("precise", "BatchNorm recalibration mode (with --bn-spec).", example="--bn-mode torch",
                        scope="output", choices=BN_MODES)
    keep_structure: bool = _opt(False, "Write the last selected checkpoint with its weights replaced by the average "
                                "(Lightning, timm, fairseq loaders accept it); its optimizer/scheduler states are "
                                "dropped.", example="-o swa.ckpt --keep-structure", scope="output")
    keep_optimizer: bool = _opt(False, "With --keep-structure: keep optimizer and scheduler states.",
                                example="--keep-structure --keep-optimizer", scope="output")
    format: str | None = _opt(None, "Folder output layout: megatron (a Megatron torch_dist checkpoint root, the "
                              "default when every input is one) or hf (a Hugging Face folder).",
                              example="-o avg/ --format hf", scope="output", choices=("megatron", "hf"))
    output_step: int | None = _opt(None, "Megatron output: the iteration it is saved as (default: the step of the last "
                                   "input the average uses).", example="-o avg/ --output-step 30000", scope="output",
                                   cli_type=int, metavar="N")
    extra_state_from: int | None = _opt(None, "Megatron output: copy the byte entries (Transformer Engine "
                                        "_extra_state) and common.pt from the selected checkpoint at this step "
                                        "(default: the last).", example="--extra-state-from 20000", scope="output",
                                        cli_type=int, metavar="STEP")
    shard_size: int | str | None = _opt(None, "Folder output: largest shard, e.g. 5GB (default), 500MB, 100KB.",
                                        example="--shard-size 2GB", scope="output", metavar="SIZE")
    dry_run: bool = _opt(False, "Print the plan (files, epochs/steps, weights) and read no tensor data.",
                         example="--dry-run", scope="output")
    progress: bool = _opt(False, "Show a progress bar on stderr.", scope="output", cli=False)
    distributed: bool | None = _opt(None, "Split the merge across the ranks of torch.distributed: None (auto: under "
                                    "torchrun or in an initialised process group), True, or False (this process "
                                    "merges alone, e.g. when only rank 0 calls merge).", scope="output", cli=False)


def option_fields(scope: str | None = None) -> list[Any]:
    """The declared options (dataclass fields), optionally of one scope (``"plan"``/``"output"``)."""
    return [f for f in fields(MergeOptions) if scope is None or f.metadata["scope"] == scope]


def collect(values: dict[str, Any], allowed: Sequence[Any], where: str) -> MergeOptions:
    """Options from keyword arguments; an unknown name is a ``TypeError`` as in any Python call."""
    names = {f.name for f in allowed}
    bad = [k for k in values if k not in names]
    if bad:
        raise TypeError(f"{where}() got an unexpected keyword argument {bad[0]!r}")
    return MergeOptions(**values)


def api_signature(func: Callable[..., Any], allowed: Sequence[Any]) -> inspect.Signature:
    """``func``'s own positional parameters followed by the declared options as keyword-only
    parameters (with their types and defaults), for ``help()`` and IDEs."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    ann = {f.name: f.type for f in fields(MergeOptions)}
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=ann[f.name])
             for f in allowed if f.default is not MISSING]
    return inspect.Signature(own + extra, return_annotation=inspect.signature(func).return_annotation)


def click_options(command: Callable[..., Any] | None = None, *, only: Sequence[str] | None = None) -> Any:
    """Decorate a click command with every declared option that has a command-line form
    (``@click_options``), or with the options named in ``only`` (``@click_options(only=[...])``)."""
    import click

    if command is None:
        return lambda cmd: click_options(cmd, only=only)
    for f in reversed(fields(MergeOptions)):
        md = f.metadata
        if not md["cli"] or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": md["help"]}
        if md["metavar"]:
            kw["metavar"] = md["metavar"]
        if isinstance(f.default, bool):
            kw["is_flag"] = True
        elif md["sweep"]:
            kw["type"] = str  # a value, or several separated by commas: one output each (see expand_variants)
            one = "|".join(md["choices"]) if md["choices"] else (md["metavar"] or f.name.upper().replace("_", "-"))
            kw["metavar"] = f"{one}[,...]"
            kw["help"] = md["help"] + " Several values, comma separated: one output each."
        elif md["choices"]:
            kw["type"] = click.Choice(list(md["choices"]))
        elif md["cli_type"] is not None:
            kw["type"] = md["cli_type"]
        if md["multiple"]:
            kw["multiple"] = True
        elif not isinstance(f.default, bool) and f.default is not None:
            kw["default"] = f.default
            kw["show_default"] = True
        command = click.option(flag, f.name, **kw)(command)
    return command


def _values(name: str, value: Any) -> list[Any]:
    """One option's values: a list given in Python, or a comma-separated string (the CLI). For
    ``epochs``/``steps`` a tuple ``(low, high)`` or a ``range`` is one range, not two values."""
    if name in ("epochs", "steps") and isinstance(value, (tuple, range)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _typed(f: Any, text: Any) -> Any:
    """A swept value as its option's type (the CLI hands strings)."""
    kind = f.metadata["cli_type"]
    if not isinstance(text, str) or kind is None:
        if f.metadata["choices"] and isinstance(text, str) and text not in f.metadata["choices"]:
            from .errors import OptionError

            raise OptionError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])}, "
                              f"got {text!r}")
        return text
    try:
        return kind(text)
    except ValueError:
        from .errors import OptionError

        raise OptionError(f"--{f.name.replace('_', '-')}: {text!r} is not a valid {kind.__name__}") from None


def single_values(opts: MergeOptions) -> dict[str, str]:
    """The sweepable options given one value, as text (an output-name template may name them too).

    Example::

        single_values(MergeOptions(method="power-ema", sigma_rel="0.05"))  # {'sigma_rel': '0.05', ...}
    """
    swept = [(f, _values(f.name, getattr(opts, f.name))) for f in fields(MergeOptions) if f.metadata["sweep"]]
    return {f.name: str(vals[0]) for f, vals in swept if len(vals) == 1 and vals[0] is not None}


def expand_variants(opts: MergeOptions) -> list[tuple[dict[str, str], MergeOptions]]:
    """Several values for the sweepable options (``sigma_rel=[0.05, 0.1]``, ``last="2,4,8"``, ...) ask
    for several outputs from one pass: their cartesian product, each with the values that made it
    (as text, for output-name templates). One value each gives one variant with no names.

    Example::

        expand_variants(MergeOptions(method="power-ema", sigma_rel="0.05,0.10"))
        # [({'sigma_rel': '0.05'}, MergeOptions(..., sigma_rel=0.05)), ({'sigma_rel': '0.10'}, ...)]
    """
    import itertools
    from dataclasses import replace

    swept = [(f, _values(f.name, getattr(opts, f.name))) for f in fields(MergeOptions) if f.metadata["sweep"]]
    names = [(f, vals) for f, vals in swept if len(vals) > 1]
    single = {f.name: _typed(f, vals[0]) for f, vals in swept if len(vals) == 1}
    base = replace(opts, **single)
    if not names:
        return [({}, base)]
    out = []
    for combo in itertools.product(*[vals for _f, vals in names]):
        label = {f.name: str(v) for (f, _vals), v in zip(names, combo)}
        out.append((label, replace(base, **{f.name: _typed(f, v) for (f, _vals), v in zip(names, combo)})))
    return out
