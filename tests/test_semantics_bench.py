"""`megaclass bench knn` runs end to end at a small size and its answer agrees with a dense top-k."""
import json
import math

from megaclass.cli import main


def test_bench_knn_small(tmp_path, capsys):
    out = tmp_path / "knn_bench.json"
    code = main(["bench", "knn", "--classes", "3000", "--dim", "64", "--block-size", "512",
                 "--check-rows", "3000", "--rate-seconds", "0.2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["embeddings"]
    assert result["checked_rows"] == 3000 and result["checked_rows_agree"] is True
    assert result["classes"] == 3000
    # timings are reported, never judged: a quiet machine can finish the floor in under a millisecond
    for key in ("floor_s", "time_s", "ratio_to_floor"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] >= 0, key
