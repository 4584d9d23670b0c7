"""`megaclass bench data`: the power-law extrapolation against a hand computation, and a tiny run that
writes a valid JSON and plot."""
import json

import numpy as np
import pytest

from megaclass.bench.data import STEPS, extrapolate


def test_extrapolation_recovers_a_power_law():
    def row(n):  # time 3e-6·N^1.0 … 1.2e-5·N^1.5, CPU 1e-6·N, memory 1e3·N^0.5
        return {"images": n, **{s: {"seconds": 3e-6 * (k + 1) * n ** (1 + k / 6), "cpu_seconds": 1e-6 * n,
                                    "peak_rss_bytes": 1e3 * n ** 0.5}
                                for k, s in enumerate(STEPS)}}

    predicted, fits = extrapolate([row(10**5), row(4 * 10**5), row(10**6)], [16 * 10**6])
    want = row(16 * 10**6)
    for k, s in enumerate(STEPS):
        assert fits[f"{s}_seconds_exponent"] == pytest.approx(1 + k / 6, abs=1e-3)
        assert predicted[0][s]["seconds"] == pytest.approx(want[s]["seconds"], rel=1e-6)
        assert predicted[0][s]["peak_rss_bytes"] == pytest.approx(want[s]["peak_rss_bytes"], rel=1e-6)
    assert not fits["assumed_linear"]


@pytest.mark.slow
def test_tiny_bench_writes_json_and_plot(tmp_path):
    from megaclass.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--images", "1400", "--classes", "20", "--json", str(out),
                 "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    (row,) = result["measured"]
    assert row["images"] == 1400 and row["read"]["images"] == 1400  # every generated image read back
    for step in STEPS:
        assert row[step]["seconds"] > 0 and row[step]["cpu_seconds"] > 0 and row[step]["peak_rss_bytes"] > 0
    assert row["stage1"]["images"] == 1400 and row["stage1"]["without_predictions"] == 0
    assert row["stage2"]["without_predictions"] == 0 and row["read_plus_stages_s"] > 0
    (big,) = result["extrapolated"]
    assert big["images"] == 16_000_000 and result["fits"]["assumed_linear"]
    assert big["read"]["seconds"] == pytest.approx(row["read"]["seconds"] * 16e6 / 1400)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "data_1400").exists()  # generated data removed
