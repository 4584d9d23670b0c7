"""`megaclass bench lm` end to end at a tiny size: the variants that run here agree on the loss with
transformers' own, those that cannot run are skipped with a reason. (No timing is asserted.)"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from megaclass.bench.lm import available  # noqa: E402
from megaclass.cli import main  # noqa: E402


def test_variants_agree_on_the_loss(tmp_path, capsys):
    out = tmp_path / "lm.json"
    variants = ["unpatched", "megaclass", "cce", "liger"]  # cce-op compiles for a minute: left to the benchmark
    assert main(["bench", "lm", "--family", "gpt2", "--vocab", "300", "--hidden", "64", "--layers", "1",
                 "--seq", "16", "--batch", "2", "--repeats", "1", "--variants", ",".join(variants),
                 "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == variants
    own = rows["unpatched"]["loss"]
    assert math.isfinite(own) and abs(own - math.log(300)) < 0.5  # a random model: about log V
    for name in variants[1:]:
        why = available(name, "cpu")
        if why is not None:
            assert rows[name] == {"variant": name, "skipped": why}
            continue
        assert "error" not in rows[name], rows[name]
        assert rows[name]["median_s"] > 0 and rows[name]["peak_bytes"] >= 0
        # fp32: the fused loss and transformers' fp32 cross-entropy round differently
        assert abs(rows[name]["loss"] - own) <= 1e-5 * own, name
    assert available("megaclass", "cpu") is None and available("liger", "cpu") is not None
    table = capsys.readouterr().out
    assert "| megaclass |" in table and "× unpatched" in table and "skipped: Liger-Kernel runs on CUDA only" in table


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match="unknown variant"):
        main(["bench", "lm", "--variants", "megaclass,nope"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit: usage error, code 2
        main(["bench", "lm", "--seq", "0"])
    assert exit_info.value.code == 2
    assert "argument --seq: must be a positive integer, got '0'" in capsys.readouterr().err
