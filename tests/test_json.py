"""`--json`: one JSON document on stdout for merge, bn, inspect, sweep and soup (and for their
errors), each valid against the documented schema (ckptavg.events.SCHEMAS); exit codes stable."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file, save_file

from ckptavg.events import EXIT_CODES, SCHEMAS, document, dumps, event, schema_of, validate

from .conftest import fp64_mean, make_state_dicts
from .test_bn_cli import bn_setup  # noqa: F401  (fixture)
from .test_sweep import SPEC, run  # noqa: F401  (fixture)


def _doc(stdout: str) -> dict:
    doc = json.loads(stdout)  # exactly one document: json.loads refuses trailing text
    errs = validate(doc, schema_of(doc))
    assert errs == [], errs
    return doc


@pytest.fixture
def three(tmp_path):
    sds = make_state_dicts(3, seed=1)
    paths = []
    for i, sd in enumerate(sds):
        p = tmp_path / f"step-{i}.safetensors"
        save_file(sd, p, metadata={"step": str(10 * (i + 1))})
        paths.append(p)
    return sds, paths


def test_merge_json_document_matches_the_output(three, tmp_path, run_cli):
    sds, paths = three
    out = tmp_path / "avg.safetensors"
    code, stdout, err = run_cli("merge", *paths, "-o", out, "--json", "--last", "2")
    assert code == 0, err
    doc = _doc(stdout)
    assert doc["schema"] == "ckptavg/1" and doc["command"] == "merge"
    assert [i["path"] for i in doc["inputs"]] == [str(p) for p in paths[1:]]
    assert [i["step"] for i in doc["inputs"]] == [20, 30]
    assert math.isclose(sum(i["weight"] for i in doc["inputs"]), 1.0)
    written = load_file(out)
    assert doc["bytes_written"] == sum(t.numel() * t.element_size() for t in written.values())  # tensor bytes
    got = written["fc.weight"]
    ref = fp64_mean([sds[1]["fc.weight"], sds[2]["fc.weight"]])
    assert (got.double() - ref).abs().max() < 1e-6
    code, stdout, _ = run_cli("merge", *paths, "-o", tmp_path / "x.pt", "--json", "--dry-run")
    assert code == 0 and _doc(stdout)["dry_run"] is True


def test_inspect_and_error_documents_and_exit_codes(three, tmp_path, run_cli):
    _sds, paths = three
    code, stdout, _ = run_cli("inspect", *paths, "--json")
    doc = _doc(stdout)
    assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [10, 20, 30]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    code, stdout, err = run_cli("merge", paths[0], bad, "-o", tmp_path / "o.pt", "--json")
    doc = _doc(stdout)
    assert code == EXIT_CODES["error"] == doc["error"]["exit_code"] == 1
    assert doc["command"] == "merge" and "bad.safetensors" in doc["error"]["message"]
    assert err.startswith("ckptavg: error:") and not (tmp_path / "o.pt").exists()
    code, stdout, err = run_cli("merge", *paths, "-o", tmp_path / "o.pt", "--json", "--method", "nope")
    assert code == EXIT_CODES["usage"] == 2 and "nope" in err
    assert _doc(stdout)["error"]["exit_code"] == 2
    # watch prints JSON lines: its fatal errors are one error event
    code, stdout, err = run_cli("watch", tmp_path, "-o", tmp_path / "o.pt", "--json", "--dry-run")
    assert code == 2 and [json.loads(x)["event"] for x in stdout.splitlines()] == ["error"]
    assert _doc(stdout)["exit_code"] == 2 and "--dry-run" in err
    code, stdout, _ = run_cli("inspect", paths[0], bad, "--json")  # the report, then exit 1
    assert code == 1 and _doc(stdout)["checkpoints"][1]["error"]


def test_bn_json_document(bn_setup, run_cli, tmp_path):  # noqa: F811
    tmp, spec, runs, _sds, _mod = bn_setup
    src = tmp / "avg.pt"
    assert run_cli("merge", runs, "-o", src)[0] == 0
    code, stdout, err = run_cli("bn", src, "--spec", spec, "-o", tmp / "bn.pt", "--json", "-q")
    assert code == 0, err
    doc = _doc(stdout)
    assert doc["bn"]["mode"] == "precise" and doc["bn"]["batches"] == 5 and doc["bn"]["layers"]
    assert 0 < doc["bytes_written"] <= (tmp / "bn.pt").stat().st_size


def test_sweep_and_soup_json_documents(run, run_cli, tmp_path):  # noqa: F811
    root, _, folders = run
    spec = root / "plain.toml"
    spec.write_text(SPEC.format(factory="build_plain", metric="loss", higher="false"))
    code, stdout, err = run_cli("sweep", folders["build_plain"], "--spec", spec, "--last", "2", "--json", "-q")
    assert code == 0, err
    doc = _doc(stdout)
    assert sum(r["winner"] for r in doc["rows"]) == 1 and doc["winner"] in [r["name"] for r in doc["rows"]]
    code, stdout, err = run_cli("soup", folders["build_plain"], "--spec", spec, "--last", "2", "--json", "-q")
    assert code == 0, err
    assert _doc(stdout)["command"] == "soup"


def test_validator_rejects_what_the_schema_forbids():
    good = document("merge", {"method": "uniform", "inputs": [{"path": "a", "weight": 1.0, "epoch": None,
                                                                "step": 3}],
                              "tensors": 2, "output": "o.pt", "bytes_written": 8, "bytes_read": 8, "seconds": 0.1,
                              "dry_run": False})
    assert validate(good, SCHEMAS["merge"]) == []
    assert validate({**good, "tensors": "2"}, SCHEMAS["merge"]) == ["$.tensors: str is not integer"]
    assert validate({**good, "dry_run": 0}, SCHEMAS["merge"]) == ["$.dry_run: int is not boolean"]
    missing = {k: v for k, v in good.items() if k != "inputs"}
    assert validate(missing, SCHEMAS["merge"]) == ["$: missing required field inputs"]
    bad_input = {**good, "inputs": [{"path": "a", "weight": True, "epoch": None, "step": None}]}
    assert validate(bad_input, SCHEMAS["merge"]) == ["$.inputs[0].weight: bool is not number"]
    ev = event("skipped", path="x.pt", reason="incomplete", detail="2 of 9 bytes")
    assert validate(ev, schema_of(ev)) == []
    assert validate({**ev, "reason": "other"}, schema_of(ev)) != []
    assert json.loads(dumps({**ev, "x": float("nan")}))["x"] is None  # strict JSON: NaN is null
