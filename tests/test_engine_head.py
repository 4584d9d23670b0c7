"""The evaluation metric, the data order, and the weights table."""
import pytest
import torch
from engine_helpers import write_webvision

from megaclass.engine.config import config_from_dict
from megaclass.engine.data import RankBatches, epoch_order, load_run_data, read_weight_table
from megaclass.engine.trainer import balanced_topk

def test_balanced_topk_averages_per_class_accuracy():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    preds = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1], [1, 0], [0, 1]])
    got = balanced_topk(preds, labels, ks=(1, 2))
    # class 0: 2/4 top-1, 3/4 top-2; class 1: 1/1, 1/1; class 2: 0/1, 0/1
    assert got["top1"] == pytest.approx((0.5 + 1 + 0) / 3 * 100)
    assert got["top2"] == pytest.approx((0.75 + 1 + 0) / 3 * 100)



def test_balanced_topk_leaves_out_images_without_a_prediction():
    labels = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([[0, 1], [-1, -1], [1, 0], [-1, -1]])  # rows 1 and 3: unreadable images
    assert balanced_topk(preds, labels, ks=(1,))["top1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no image of the evaluation set could be read"):
        balanced_topk(torch.full((2, 2), -1), torch.tensor([0, 1]))


def test_rank_batches_tile_the_global_batch_and_resume_mid_epoch():
    order_fn = lambda epoch: epoch_order(10, seed=1, epoch=epoch)  # noqa: E731
    world, micro = 2, 2
    full = [list(RankBatches(10, r, world, micro, total_micro_steps=5, order_fn=order_fn)) for r in range(world)]
    # 10 items, global batch 4: 2 micro-steps per epoch, the last 2 items of each epoch dropped
    for step in range(5):
        epoch = step // 2
        global_rows = [i for r in range(world) for _, i in full[r][step]]
        j = step % 2
        assert global_rows == order_fn(epoch)[j * 4:(j + 1) * 4].tolist()
        assert {e for r in range(world) for e, _ in full[r][step]} == {epoch}
    resumed = list(RankBatches(10, 1, world, micro, total_micro_steps=5, order_fn=order_fn, start=3))
    assert resumed == full[1][3:]
    predict = [list(RankBatches(5, r, 2, 2)) for r in range(2)]  # one pass in order, padded with -1
    assert [[i for _, i in b] for b in predict[0]] == [[0, 1], [4, -1]]
    assert [[i for _, i in b] for b in predict[1]] == [[2, 3], [-1, -1]]


def test_class_balanced_order_draws_classes_evenly():
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = epoch_order(100, seed=0, epoch=0, labels=labels)
    share = (labels[order] == 1).float().mean()
    assert 0.35 < share < 0.65  # uniform over 2 classes, 100 draws: 5 standard deviations wide
    assert not torch.equal(order, epoch_order(100, seed=0, epoch=1, labels=labels))


def test_weights_table_errors_name_file_and_line(tmp_path):
    path = tmp_path / "w.tsv"
    path.write_text("a.jpg\t0.5\nb.jpg\t2\n")
    assert read_weight_table(str(path), ["b.jpg", "a.jpg"]).tolist() == [2.0, 0.5]
    for text, message in [("a.jpg\t-1\nb.jpg\t1\n", "w.tsv:1: weight must be finite"),
                          ("a.jpg\tx\n", "w.tsv:1: weight 'x' is not a number"),
                          ("a.jpg 1\n", "w.tsv:1: expected"),
                          ("a.jpg\t1\nb.jpg\t1\nc.jpg\t1\n", "w.tsv: image 'c.jpg' is not in the training set"),
                          ("a.jpg\t1\n", "no weight for 1 training images, e.g. 'b.jpg'")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_weight_table(str(path), ["a.jpg", "b.jpg"])


def test_run_data_loads_the_layout_and_fails_naming_the_file(tmp_path):
    root = write_webvision(str(tmp_path / "data"), classes=3, per_class=4, val_per_class=2)
    cfg = config_from_dict({"data": {"root": root, "image_size": 16}})
    data = load_run_data(cfg)
    assert len(data.train) == 12 and len(data.val) == 6 and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    image, label, index = data.train[5]
    assert image.shape == (3, 16, 16) and label == 1 and index == 5
    with pytest.raises(Exception, match="synsets.txt"):
        load_run_data(config_from_dict({"data": {"root": str(tmp_path / "nothing")}}))


def test_head_gradient_clipping_scales_to_the_norm():
    from torch import nn

    from megaclass.nn import clip_head_grad_

    head = nn.Linear(3, 2)
    head.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    head.bias.grad = torch.tensor([0.0, 12.0])  # norm sqrt(9 + 16 + 144) = 13
    assert clip_head_grad_(head, 1.0) == pytest.approx(13.0)
    assert torch.linalg.vector_norm(torch.cat([head.weight.grad.flatten(), head.bias.grad])) == pytest.approx(1.0, rel=1e-5)
    assert clip_head_grad_(head, 5.0) == pytest.approx(1.0, rel=1e-5)  # below the limit: unchanged
