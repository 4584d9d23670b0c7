"""`megaclass bench ce` end to end at a tiny size: every variant computes the same loss, the table and the
JSON report hold each variant's ratio to the floor, and --tp 2 reproduces the one-rank loss.
(No timing is asserted: timings on a shared machine are noise.)"""
from __future__ import annotations

import json
import math

import pytest

from megaclass.bench.ce import available
from megaclass.cli import main


def test_variants_agree_and_report(tmp_path, capsys):
    out = tmp_path / "results" / "ce.json"  # a folder not made yet: written atomically through megaclass.io
    compiled = ["megaclass", "megaclass-fold"] if available("megaclass", "cpu") is None else []
    variants = ["megaclass-twin", "naive", "floor"] + compiled
    code = main(["bench", "ce", "--n", "64", "--d", "16", "--c", "1000", "--repeats", "1",
                 "--variants", ",".join(variants), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["ce.json"]  # no temp file left behind
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == set(variants)
    assert report["config"]["c"] == 1000 and report["config"]["tp"] == 1
    for name in variants:  # timings and their ratio are reported, never judged (a quiet machine rounds them)
        for key in ("median_s", "peak_bytes", "faults_per_step") + (("floor_ratio",) if name != "floor" else ()):
            assert isinstance(rows[name][key], (int, float)) and math.isfinite(rows[name][key]) and rows[name][key] >= 0
        assert ("floor_ratio" in rows[name]) == (name != "floor")
    naive = rows["naive"]["loss"]
    assert math.isfinite(naive) and naive > 0
    for name in set(variants) - {"naive", "floor"}:
        assert abs(rows[name]["loss"] - naive) <= 1e-5 * naive, name
    table = capsys.readouterr().out
    assert "× floor" in table and "megaclass-twin" in table and "1.000" in table  # the floor's own ratio


def test_tensor_parallel_matches_one_rank(tmp_path):
    if available("megaclass", "cpu") is not None:
        pytest.skip("megaclass._C is not built")
    out = tmp_path / "tp.json"
    assert main(["bench", "ce", "--n", "32", "--d", "8", "--c", "777", "--tp", "2", "--repeats", "1",
                 "--variants", "megaclass", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"megaclass (2 ranks)", "megaclass (1 rank)"}
    one = rows["megaclass (1 rank)"]["loss"]
    assert abs(rows["megaclass (2 ranks)"]["loss"] - one) <= 1e-5 * one


def test_inputs_drawn_on_the_device(tmp_path):
    """--init device (the GPU check's: no CPU draw of the weight): the variants still agree on its inputs."""
    out = tmp_path / "device.json"
    assert main(["bench", "ce", "--n", "48", "--d", "16", "--c", "500", "--repeats", "1", "--init", "device",
                 "--variants", "megaclass-twin,naive", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert report["config"]["init"] == "device"
    naive = rows["naive"]["loss"]
    assert math.isfinite(naive) and naive > 0 and abs(rows["megaclass-twin"]["loss"] - naive) <= 1e-5 * naive


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="unknown variant"):
        main(["bench", "ce", "--variants", "fastest"])
    with pytest.raises(SystemExit, match="--c ≥ --tp"):
        main(["bench", "ce", "--c", "1", "--tp", "2"])
    with pytest.raises(SystemExit, match="--init device.*--tp 1"):
        main(["bench", "ce", "--init", "device", "--tp", "2"])
