"""`megaclass train` and `megaclass predict` with `data.shards`, as commands: training on 2 deepspeed
ranks from shards counts the images that do not decode over both ranks into eval.json, and predictions
from shards are the rows predictions from the files are."""
import json
import sys
import textwrap

import pytest
from test_run_commands import BIN, _run

from megaclass.data import load_webvision
from megaclass.data.shards import convert


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-commands")
    data = root / "data"
    made = _run([sys.executable, "-m", "megaclass.cli", "synth", "--out", str(data), "--classes", "6",
                 "--per-class", "10", "--val-per-class", "2", "--image-size", "16"], cwd=root)
    assert made.returncode == 0, made.stdout[-3000:]
    wv = load_webvision(data)
    for path in (wv.train[5].path, wv.val[3][0]):  # the header opens, the pixels are cut short: fails at decode
        image = (data / path).read_bytes()
        scan = image.index(b"\xff\xda")  # start of the entropy-coded pixels
        (data / path).write_bytes(image[: scan + (len(image) - scan) // 2])
    convert(data, root / "shards", per_shard=16, progress=False)
    config = root / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        run_dir: {root / "run"}
        model: {{name: resnet_tiny}}
        data: {{shards: {root / "shards"}, image_size: 16, num_workers: 1}}
        train: {{micro_batch_size: 4, max_steps: 2, progress: false}}
        parallel: {{timeout_s: 300}}
        eval: {{batch_size: 8}}
        """))
    from dist_utils import free_port

    trained = _run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                    "megaclass.train", "--config", str(config)], cwd=root)
    return root, data, config, trained


@pytest.mark.timeout(900)
def test_training_on_shards_counts_the_undecodable_images_of_both_ranks(setup):
    root, _, _, trained = setup
    assert trained.returncode == 0, trained.stdout[-3000:]
    result = json.loads((root / "run" / "eval.json").read_text())
    assert result["skipped"] == 1  # one validation image, read by one of the two ranks
    assert 0 <= result["top1"] <= 100


@pytest.mark.timeout(900)
def test_predict_from_shards_writes_the_rows_predict_from_files_writes(setup):
    root, data, config, trained = setup
    assert trained.returncode == 0, trained.stdout[-3000:]
    outs = {}
    for name, source in (("files", f"data.root={data}"), ("shards", f"data.shards={root / 'shards'}")):
        extra = ["--set", "data.shards=null"] if name == "files" else []
        done = _run([sys.executable, "-m", "megaclass.cli", "predict", "--config", str(config), "--checkpoint",
                     str(root / "run"), "--set", source, *extra, "--out", str(root / f"{name}.tsv")], cwd=root)
        assert done.returncode == 0, done.stdout[-3000:]
        outs[name] = (root / f"{name}.tsv").read_text()
    assert outs["shards"] == outs["files"]
    assert len(outs["files"].splitlines()) == len(load_webvision(data).train)
