"""The documentation's images, made at build time (by hooks.py) rather than drawn by hand.

``bench_engine.png`` and ``bench_several_outputs.png`` plot ``docs/data/benchmarks.json``: the
figures benchmarks/bench.py measured (its own JSON output is not checked in). ``sweep.png`` and
``soup.png`` are the plots the digits example writes (examples/digits/). Run it alone to write
the images into a folder: ``python docs/gen_plots.py OUT_DIR``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "benchmarks.json"


def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})  # type: ignore[attr-defined]
    return buf.getvalue()


def images() -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(DATA.read_text())
    out: dict[str, bytes] = {}
    rows = data["engine"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r[1] for r in rows], height=0.4, label="before (57da4d0)")
    ax.barh([i - 0.2 for i in y], [r[2] for r in rows], height=0.4, label="after (worker engine)")
    ax.set_yticks(list(y), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("net seconds beyond import torch (lower is better)")
    ax.legend()
    out["bench_engine.png"] = _png(fig)
    plt.close(fig)

    rows = data["several_outputs"]["rows"]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], width=0.4, label="one pass, 4 outputs")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], width=0.4, label="4 separate merges")
    ax.set_xticks(list(x), [f"inputs {r[0]}" for r in rows])
    ax.set_ylabel("wall seconds")
    ax.legend()
    out["bench_several_outputs.png"] = _png(fig)
    plt.close(fig)

    for name in ("sweep.png", "soup.png"):
        path = ROOT / "examples" / "digits" / name
        if path.is_file():
            out[name] = path.read_bytes()
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "site-images")
    target.mkdir(parents=True, exist_ok=True)
    for name, data in images().items():
        (target / name).write_bytes(data)
        print(target / name)
