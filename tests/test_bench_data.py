"""`megaclass bench data`: the fixed + per-image fit against numpy's least squares and exact lines, and a
tiny run that writes a valid JSON and plot."""
import json

import numpy as np
import pytest

from megaclass.bench.data import STEPS, extrapolate, fit_line


def test_fit_recovers_exact_lines_and_their_loglog_slope():
    def row(n):  # step k: fixed (k + 1) s + 2e-6·(k + 1) s an image; memory 0.5 GB + 300 B an image
        return {"images": n, **{s: {"seconds": (k + 1) + 2e-6 * (k + 1) * n, "cpu_seconds": 1e-6 * n,
                                    "peak_rss_bytes": 5e8 + 300.0 * n} for k, s in enumerate(STEPS)}}

    sizes = [5 * 10**5, 10**6, 2 * 10**6]
    predicted, fits = extrapolate([row(n) for n in sizes], [16 * 10**6])
    want = row(16 * 10**6)
    assert predicted[0]["extrapolated"] is True and not fits["assumed_proportional"]
    for k, s in enumerate(STEPS):
        assert fits[f"{s}_seconds"]["fixed"] == pytest.approx(k + 1, rel=1e-6)
        assert fits[f"{s}_seconds"]["per_image"] == pytest.approx(2e-6 * (k + 1), rel=1e-6)
        assert fits[f"{s}_cpu_seconds"]["fixed"] == pytest.approx(0, abs=1e-6)
        for key in ("seconds", "cpu_seconds", "peak_rss_bytes"):
            assert predicted[0][s][key] == pytest.approx(want[s][key], rel=1e-6)
        y1, y2 = row(sizes[1])[s]["peak_rss_bytes"], row(sizes[2])[s]["peak_rss_bytes"]
        assert fits[f"{s}_peak_rss_bytes"]["loglog_slope_largest_two"] == pytest.approx(np.log(y2 / y1) / np.log(2),
                                                                                       abs=1e-3)


def test_fit_matches_lstsq_and_stays_non_negative():
    rng = np.random.default_rng(0)
    n = np.array([1e5, 3e5, 1e6, 2e6])
    y = 4.0 + 3e-6 * n + rng.normal(0, 0.2, len(n))
    want = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), y, rcond=None)[0]
    assert fit_line(n, y) == pytest.approx(tuple(want), rel=1e-9)
    # a falling line would need a negative per-image cost: the best non-negative fit is the constant mean
    y = np.array([5.0, 4.0, 3.0, 2.0])
    assert fit_line(n, y) == pytest.approx((3.5, 0.0))
    # a line through a negative intercept: the best proportional fit Σny/Σn² instead
    y = -1.0 + 1e-5 * n
    assert fit_line(n, y) == pytest.approx((0.0, float(n @ y / (n @ n))))


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
        assert 0 < row[step]["read_peak_rss_bytes"] <= row[step]["peak_rss_bytes"]  # a part of the step's peak
    assert row["stage1"]["images"] == 1400 and row["stage1"]["without_predictions"] == 0
    assert row["stage2"]["without_predictions"] == 0 and row["read_plus_stages_s"] > 0
    (big,) = result["extrapolated"]
    assert big["images"] == 16_000_000 and big["extrapolated"] and result["fits"]["assumed_proportional"]
    assert not row["extrapolated"]
    assert big["read"]["seconds"] == pytest.approx(row["read"]["seconds"] * 16e6 / 1400)
    assert row["stage1"]["em_converged"] and row["stage2"]["text_em_converged"]
    assert row["stage1"]["em_images"] == 1400  # below the sample size: EM on every image
    # the weights against the generator's truth_clean.tsv: ranks and predictions both carry it
    assert 0.75 < row["stage1"]["auc"] <= 1 and 0.75 < row["stage2"]["auc"] <= 1, (row["stage1"], row["stage2"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "data_1400").exists()  # generated data removed


def test_a_child_reports_its_own_peak_not_its_parents():
    """A child started by subprocess (vfork + exec) from a parent that touched 400 MB: its peak is its own
    (a bare Python, well under 200 MB), where getrusage would report the parent's."""
    import subprocess
    import sys

    held = np.ones(400 * 2**20, dtype=np.uint8)  # touched: resident in this process
    code = "from megaclass.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 200 * 2**20 < held.nbytes
