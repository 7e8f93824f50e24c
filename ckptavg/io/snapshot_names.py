"""Power-EMA snapshots written by other tools, recognised by their file names.

* EDM2 (NVlabs/edm2) names each snapshot ``network-snapshot-<kimg, 7 digits>-<sigma_rel, .3f>.pkl``
  (``phema-...`` for its own reconstructions; ``.pt`` accepted too). When the file records no profile,
  the name gives it: sigma_rel is the number after the last dash, and the time is EDM2's image count
  for that kimg (``reconstruct_phema.py``'s ``kimg_to_nimg``: kimg*1000 rounded up to a multiple of
  1024, else kimg*1000), so the weights equal EDM2's own coefficients. A profile recorded in the file
  that contradicts the name is an error.
* ema-pytorch's ``PostHocEMA`` writes ``<index>.<step>.pt`` into its ``checkpoint_folder``: the index
  is the EMA's position in the ``sigma_rels`` the user built it with, recorded nowhere. The profiles
  come from ``--snapshot-sigma-rels 0.05,0.28`` or from a ``ckptavg-snapshots.json`` beside the
  files (``{"sigma_rels": [0.05, 0.28]}`` or ``{"gammas": [...]}``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointReadError, OptionError
from ..weights import gamma_to_sigma_rel
from .checkpoint import Checkpoint
from .files import read_small_json

__all__ = ["EDM2_NAME", "INDEXED_NAME", "SIDECAR", "edm2_name", "edm2_nimg", "apply_edm2_name",
           "parse_sigma_rels", "apply_indexed_profiles"]

EDM2_NAME = re.compile(r"^(?:network-snapshot|phema)-(\d+)-(\d\.\d{3})\.(?:pkl|pt)$")
INDEXED_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$")
SIDECAR = "ckptavg-snapshots.json"
_KEEP = ("initted", "step")  # KarrasEMA's counters beside "ema_model.*" in an ema-pytorch snapshot
_PREFIX = "ema_model."


def edm2_nimg(kimg: int) -> int:
    """EDM2's training time (images) of a snapshot named by ``kimg`` (as its reconstruct_phema.py)."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    return nimg if nimg // 1000 == kimg else kimg * 1000


def edm2_name(name: str) -> tuple[int, str] | None:
    """``(time in images, sigma_rel text)`` of an EDM2 snapshot's file name, else None.

    Example::

        edm2_name("network-snapshot-0002097-0.050.pkl")  # (2097152, '0.050')
    """
    m = EDM2_NAME.match(name)
    return (edm2_nimg(int(m.group(1))), m.group(2)) if m else None


def apply_edm2_name(ckpt: Checkpoint) -> None:
    """Step and profile from an EDM2 snapshot's name where the file records none; a recorded profile
    that differs from the name's (beyond its 3 decimals) is a :class:`CheckpointReadError`."""
    found = edm2_name(ckpt.path.name)
    if found is None:
        return
    nimg, text = found
    from .metadata import check_profile  # (metadata imports this module)

    named = float(text)
    check_profile(ckpt.path, "sigma_rel", text, named)
    m = ckpt.meta
    recorded = m.sigma_rel if m.sigma_rel is not None else (
        gamma_to_sigma_rel(m.gamma) if m.gamma is not None else None)
    if recorded is not None and abs(recorded - named) > 0.0005 + 1e-12:
        raise CheckpointReadError(
            f"{ckpt.path}: records the power-EMA profile sigma_rel {recorded:.6g}, but its EDM2 name says {text}; "
            "rename the file or fix the recorded profile")
    if recorded is None:
        m.sigma_rel = named
    if m.step is None or m.step_from == "name":
        m.step, m.step_from = nimg, "name"


def parse_sigma_rels(value: str | Sequence[float] | None, what: str = "--snapshot-sigma-rels") -> list[float] | None:
    """``"0.05,0.28"`` or a sequence -> the list of profiles (each a valid sigma_rel)."""
    if value is None:
        return None
    from .metadata import SIGMA_REL_MAX

    try:
        vals = [float(x) for x in value.replace(" ", "").split(",") if x] if isinstance(value, str) else \
            [float(x) for x in value]
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be comma-separated sigma_rels (e.g. 0.05,0.28), got {value!r}") from None
    if not vals or not all(0 < v < SIGMA_REL_MAX for v in vals):
        raise OptionError(f"{what}: each sigma_rel must be in (0, {SIGMA_REL_MAX}), got {value!r}")
    return vals


def _sidecar(folder: Path) -> tuple[str, list[float]] | None:
    """``("sigma_rel" | "gamma", values)`` from the folder's ckptavg-snapshots.json, if there is one."""
    f = folder / SIDECAR
    if not f.is_file():
        return None
    try:
        data = read_small_json(f, 1 << 20)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointReadError(f"{f}: not readable JSON ({type(e).__name__})") from None
    if isinstance(data, dict) and "sigma_rels" in data:
        return "sigma_rel", parse_sigma_rels(data["sigma_rels"], f"{f}: 'sigma_rels'") or []
    gammas = data.get("gammas") if isinstance(data, dict) else None
    if isinstance(gammas, list) and gammas and all(isinstance(g, (int, float)) and 0 < g <= 1e6 for g in gammas):
        return "gamma", [float(g) for g in gammas]
    raise CheckpointReadError(f"{f}: expected {{\"sigma_rels\": [0.05, 0.28]}} or {{\"gammas\": [...]}}")


def _profiles_for(folder: Path, given: list[float] | None) -> tuple[str, list[float]] | None:
    side = _sidecar(folder)
    if given is not None and side is not None and side != ("sigma_rel", given):
        raise OptionError(f"--snapshot-sigma-rels {','.join(map(str, given))} disagrees with "
                          f"{folder / SIDECAR} ({side[0]}s {side[1]})")
    return ("sigma_rel", given) if given is not None else side


def apply_indexed_profiles(opened: Sequence[Checkpoint], given: str | Sequence[float] | None, method: str,
                           key: str | None) -> list[str]:
    """Give ema-pytorch snapshots (``<index>.<step>.pt`` recording no profile) their step and profile;
    returns notes for the plan. Without profiles, ``--method power-ema`` is a one-line OptionError."""
    sigma_rels = parse_sigma_rels(given)
    indexed = [(c, m) for c in opened if (m := INDEXED_NAME.match(c.path.name))
               and c.meta.sigma_rel is None and c.meta.gamma is None]
    if sigma_rels is not None and not indexed:
        raise OptionError("--snapshot-sigma-rels applies to ema-pytorch snapshots named <index>.<step>.pt that "
                          "record no profile; no input is one")
    power = method.lower().replace("_", "-") == "power-ema"
    folders: dict[Path, tuple[str, list[float]] | None] = {}
    stripped = False
    for c, m in indexed:
        if c.path.parent not in folders:
            folders[c.path.parent] = _profiles_for(c.path.parent, sigma_rels)
        profiles = folders[c.path.parent]
        if profiles is None:
            if not power:
                continue
            raise OptionError(
                f"{c.path}: an ema-pytorch PostHocEMA snapshot (<index>.<step>.pt) records no power-EMA profile; "
                f"pass --snapshot-sigma-rels with the PostHocEMA's sigma_rels (e.g. 0.05,0.28) or write them to "
                f"{c.path.parent / SIDECAR}")
        _set_profile(c, int(m.group(1)), int(m.group(2)), *profiles)
        stripped = (key is None and _strip_karras(c)) or stripped
    return [f"ema-pytorch snapshots: the EMA model's own weights ('{_PREFIX}' removed from the names; "
            f"KarrasEMA's {' and '.join(_KEEP)} counters left out)"] if stripped else []


def _set_profile(c: Checkpoint, index: int, step: int, kind: str, values: list[float]) -> None:
    if index >= len(values):
        raise OptionError(f"{c.path}: profile index {index}, but only {len(values)} {kind}s are given "
                          f"({','.join(map(str, values))})")
    setattr(c.meta, kind, values[index])
    c.meta.step, c.meta.step_from = step, "name"


def _strip_karras(c: Checkpoint) -> bool:
    """A KarrasEMA state dict ("ema_model.*" plus its counters) -> the EMA model's own state dict."""
    names = [n for n in c.tensors if n not in _KEEP]
    if not names or not all(n.startswith(_PREFIX) for n in names):
        return False
    c.tensors = {n[len(_PREFIX):]: ref for n, ref in c.tensors.items() if n not in _KEEP}
    for n, ref in c.tensors.items():
        ref.name = n
    return True
