"""Run fairseq's or timm's own checkpoint-averaging script as a benchmark baseline.

    python benchmarks/script_baseline.py fairseq PATH/TO/fairseq/scripts/average_checkpoints.py OUT IN...
    python benchmarks/script_baseline.py timm PATH/TO/pytorch-image-models/avg_checkpoints.py OUT IN...

The scripts are not part of this repository: point ``bench.py --fairseq``/``--timm`` at a local
checkout. When the ``fairseq``/``timm`` package itself is not installed, the few names the script
imports from it are provided here (fairseq: ``PathManager.open``/``ls``, which are ``open`` and
``os.listdir`` for local files; timm: ``load_state_dict``, which for a plain state dict is
``torch.load(map_location="cpu")``, and safetensors' ``load_file`` for ``.safetensors``), so what is
timed is the script's own loop. fairseq's script expects fairseq checkpoints (``{"model": ...}``):
plain state dicts are wrapped so on load. timm's script reads the checkpoints of a folder: the
inputs are linked into a fresh folder first. Both outputs are fsynced afterwards, as ckptavg's is.
"""

from __future__ import annotations

import os
import runpy
import sys
import types
from pathlib import Path


def _fairseq_shim() -> None:
    try:
        import fairseq.file_io  # noqa: F401
        return
    except ImportError:
        pass

    class PathManager:
        open = staticmethod(open)
        ls = staticmethod(os.listdir)
        isfile = staticmethod(os.path.isfile)
        exists = staticmethod(os.path.exists)

    pkg = types.ModuleType("fairseq")
    mod = types.ModuleType("fairseq.file_io")
    mod.PathManager = PathManager  # type: ignore[attr-defined]
    pkg.file_io = mod  # type: ignore[attr-defined]
    sys.modules["fairseq"], sys.modules["fairseq.file_io"] = pkg, mod


def _wrap_plain_state_dicts() -> None:
    import torch

    load = torch.load

    def wrapped(*args, **kwargs):
        obj = load(*args, **kwargs)
        if isinstance(obj, dict) and "model" not in obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": obj}
        return obj

    torch.load = wrapped


def _timm_shim() -> None:
    try:
        import timm.models  # noqa: F401
        return
    except ImportError:
        pass
    import torch

    def _torch_load(path, map_location="cpu", weights_only=True):
        return torch.load(path, map_location=map_location, weights_only=weights_only)

    def load_state_dict(path, use_ema=True):
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return _torch_load(path)

    pkg, models, helpers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models._helpers"))
    models.load_state_dict = load_state_dict  # type: ignore[attr-defined]
    helpers._torch_load = _torch_load  # type: ignore[attr-defined]
    pkg.models, models._helpers = models, helpers  # type: ignore[attr-defined]
    sys.modules.update({"timm": pkg, "timm.models": models, "timm.models._helpers": helpers})


def main(argv: list[str]) -> int:
    which, script, out, ins = argv[0], argv[1], argv[2], argv[3:]
    if which == "fairseq":
        _fairseq_shim()
        _wrap_plain_state_dicts()
        sys.argv = [script, "--inputs", *ins, "--output", out]
    elif which == "timm":
        _timm_shim()
        ext = Path(ins[0]).suffix
        folder = Path(out + ".inputs")
        folder.mkdir()
        for k, p in enumerate(ins):
            os.symlink(os.path.abspath(p), folder / f"{k:04d}{ext}")
        sys.argv = [script, "--input", str(folder), "--filter", f"*{ext}", "-n", str(len(ins)), "--no-sort",
                    "--output", out] + (["--safetensors"] if ext == ".safetensors" else [])
    else:
        return f"unknown baseline {which!r}: fairseq or timm"  # type: ignore[return-value]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if which == "timm":
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
