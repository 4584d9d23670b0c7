"""Pipeline mode: two DeepSpeed pipeline stages (LayerSpecs of a timm ResNet) with the sharded head on
the last stage train exactly like one process running the whole model, dropout included (model.drop_rate:
the last stage drops the features of each image as the data-parallel trainer does)."""
import os

import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import random_items

from megaclass.engine.config import config_from_dict

N, CLASSES = 32, 5


def _config(run_dir, stages):
    return config_from_dict({
        "run_dir": run_dir, "model": {"name": "resnet_tiny", "drop_rate": 0.3}, "head": {"bias": True},
        "data": {"num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "constant"},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 3, "progress": False, "seed": 2},
        "parallel": {"pipeline_stages": stages, "zero_stage": 1 if stages > 1 else 0},
    })


def _run(rank, world, run_dir, stages):
    os.environ["LOCAL_RANK"] = str(rank)
    from megaclass.engine.pipeline import PipelineTrainer
    from megaclass.engine.trainer import TrainData, Trainer

    items = random_items(N, CLASSES, shape=(3, 16, 16))
    cls = PipelineTrainer if stages > 1 else Trainer
    trainer = cls(_config(f"{run_dir}/{world}x{stages}", stages), TrainData(items, CLASSES, items.labels, torch.linspace(0.5, 1, N)))
    losses = [r["loss"] for r in trainer.fit()]
    head = None if trainer.head is None else trainer.head.weight.detach().numpy().copy()
    last = sorted(os.listdir(f"{run_dir}/{world}x{stages}/checkpoints"))[-1]
    saved = sorted(os.listdir(f"{run_dir}/{world}x{stages}/checkpoints/{last}/head"))
    probs, classes = trainer.predict(random_items(10, CLASSES, shape=(3, 16, 16), seed=1), k=3)
    trainer.close()
    return {"losses": losses, "head": head, "saved": saved, "probs": probs.numpy(), "classes": classes.numpy(),
            "last": last}


@pytest.mark.timeout(240)
def test_two_stage_pipeline_equals_one_process(tmp_path):
    pipe = run_ranks(_run, 2, str(tmp_path), 2)
    (single,) = run_ranks(_run, 1, str(tmp_path), 1)
    assert pipe[0]["head"] is None and pipe[1]["head"] is not None  # the head lives on the last stage only
    for rank in range(2):  # every stage reports the loss of the last one
        # the same float32 arithmetic split over two processes: agreement to float32 rounding
        assert pipe[rank]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(pipe[1]["head"]), torch.from_numpy(single["head"]), rtol=1e-5, atol=1e-6)
    assert pipe[0]["saved"] == ["shard-000000000.pt"] and pipe[0]["last"] == "step-00000003"
    for rank in range(2):  # predictions (10 images: the last batch padded) reach every stage
        assert (pipe[rank]["classes"] == single["classes"]).all()
        torch.testing.assert_close(torch.from_numpy(pipe[rank]["probs"]), torch.from_numpy(single["probs"]),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(420)
def test_pipeline_with_two_data_parallel_replicas_equals_data_parallel(tmp_path):
    # 2 stages × 2 replicas against plain data parallelism over 2 ranks: each replica sees the same
    # micro-batches as the matching data-parallel rank (BatchNorm statistics are per replica in both);
    # the head is sharded over the last stage's 2 ranks, its rows never averaged
    pipe = run_ranks(_run, 4, str(tmp_path), 2)
    data_parallel = run_ranks(_run, 2, str(tmp_path), 1)
    last = [r for r in pipe if r["head"] is not None]
    assert len(last) == 2
    for rank in range(4):
        assert pipe[rank]["losses"] == pytest.approx(data_parallel[0]["losses"], rel=1e-5)
    head = torch.cat([torch.from_numpy(r["head"]) for r in last])
    single = torch.cat([torch.from_numpy(r["head"]) for r in data_parallel])
    torch.testing.assert_close(head, single, rtol=1e-5, atol=1e-6)
    # predictions reach every rank; which replica (with its own BatchNorm running statistics) scores which
    # image differs between the two layouts, so they are compared across the pipeline's ranks only
    for rank in range(1, 4):
        assert (pipe[rank]["classes"] == pipe[0]["classes"]).all()
        torch.testing.assert_close(torch.from_numpy(pipe[rank]["probs"]), torch.from_numpy(pipe[0]["probs"]))
