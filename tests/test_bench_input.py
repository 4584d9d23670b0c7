"""`megaclass bench input` at tiny sizes: its report's structure, its shards in the pinned format (read back
with plain tarfile), and the decoders' pixels against PIL's. No timing is asserted."""
import io
import json
import sys
import tarfile

import numpy as np
import torch
from PIL import Image

from megaclass.bench.input import photo_jpegs
from megaclass.cli import main
from megaclass.data.decode import decode_image

META_FIELDS = {"path", "wnid", "label", "source", "query", "rank", "title", "description", "tags"}


def test_bench_input_report_and_shards(tmp_path):
    out, work = tmp_path / "input.json", tmp_path / "work"
    assert main(["bench", "input", "--images", "6", "--rounds", "1", "--per-shard", "4", "--image-size", "96",
                 "--model", "resnet_tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--work", str(work), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["source"], r["decoder"]) for r in report["input"]] == [
        ("decode-only", "pil"), ("decode-only", "decode_image"), ("memory", "pil"), ("memory", "decode_image"),
        ("files", "decode_image"), ("shards", "decode_image"), ("shards-read-only", "none"),
        ("webdataset", "decode_image"), ("webdataset-read-only", "none")]
    assert all(r["images_per_cpu_s"] > 0 and r["images_per_s"] > 0 for r in report["input"])
    assert report["decoded_equal_to_pil"] == {"images": 6, "equal": 6}
    assert set(report["targets"]) == {"shards_images_per_core_s", "shard_overhead_vs_memory"}
    model = report["model"]
    assert (model["model"], model["device"], model["batch"], model["image_size"]) == ("resnet_tiny", "cpu", 2, 96)
    assert model["images_per_s"] > 0 and report["decode_cores_per_rank"] > 0 and "gpu_decode" not in report
    assert report["decode_cores_from"] == "shards"

    # the shards, as a reader that knows only the pinned format sees them
    images = photo_jpegs(6)
    index = json.loads((work / "shards" / "index.json").read_text())
    assert index["format"] == "megaclass-shards" and index["version"] == 1
    assert index["splits"]["train"]["samples"] == 6
    assert [(s["name"], s["samples"]) for s in index["splits"]["train"]["shards"]] == [("train-000000.tar", 4),
                                                                                     ("train-000001.tar", 2)]
    seen = []
    for shard in index["splits"]["train"]["shards"]:
        with tarfile.open(work / "shards" / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = sorted({name.split(".")[0] for name in members})
        assert all(key.isdigit() for key in keys) and len(members) == 3 * len(keys) == 3 * shard["samples"]
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert set(meta) == META_FIELDS and int(members[f"{key}.cls"]) == meta["label"]
            assert (work / "webvision" / meta["path"]).read_bytes() == members[f"{key}.jpg"]  # the bytes, unchanged
            seen.append(members[f"{key}.jpg"])
    assert seen == images
    assert report["jpeg_mean_bytes"] == round(np.mean([len(d) for d in images]))
    assert report["shard_bytes_per_image"] == round(sum((work / "shards" / s["name"]).stat().st_size
                                                        for s in index["splits"]["train"]["shards"]) / 6)


def test_benchmark_images_are_photo_sized_and_decode_to_pils_pixels():
    images = photo_jpegs(8, seed=3)
    assert 25_000 < np.mean([len(d) for d in images]) < 60_000
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and min(img.size) == 256
            expected = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(decode_image(data, "bench"), expected)


def test_without_webdataset_the_rest_still_runs(tmp_path, monkeypatch):
    """The GPU image has no webdataset unless .ci/gpu-check installs its wheel: the shards row is left out, the
    other figures remain."""
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` raises ImportError
    out = tmp_path / "input.json"
    assert main(["bench", "input", "--images", "3", "--rounds", "1", "--image-size", "96", "--model", "resnet_tiny",
                 "--batch", "1", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["source"] for r in report["input"]] == ["decode-only", "decode-only", "memory", "memory", "files"]
    assert report["shard_overhead_vs_memory"] is None and report["shard_bytes_per_image"] is None
    assert report["decode_cores_from"].startswith("files") and report["model"]["images_per_s"] > 0
