"""Backbones: timm models built offline, features without timm's classifier, pipeline layer lists that
compute exactly the model's features, local checkpoints."""
import pytest
import torch

from megaclass.models import SEED_MODELS, build_backbone
from megaclass.models.pipeline import layer_specs, release_cache, sequential_children


def test_small_model_gives_pooled_features_and_is_seeded():
    a = build_backbone("resnet_tiny", seed=1)
    b = build_backbone("resnet_tiny", seed=1)
    x = torch.randn(3, 3, 32, 32)
    out = a.eval()(x)
    assert out.shape == (3, a.num_features) == (3, 128)
    assert torch.equal(out, b.eval()(x))
    assert not torch.equal(out, build_backbone("resnet_tiny", seed=2).eval()(x))


def test_layer_specs_compute_the_same_features_as_the_model():
    model = build_backbone("resnet_tiny", seed=5).eval()
    parts = [spec.build().eval() for spec in layer_specs("resnet_tiny", seed=5)]
    release_cache()
    x = torch.randn(2, 3, 32, 32)
    y = x
    for part in parts:
        y = part(y)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)  # the same modules in the same order


def test_seed_models_build_offline_and_split_into_stages():
    expected = {"resnext101_32x8d": (2048, "conv1"), "seresnext101_32x4d": (2048, "conv1"),
                "legacy_senet154": (2048, "layer0")}
    for name in SEED_MODELS:
        children = sequential_children(name)
        assert children[0] == expected[name][1] and children[-1] == "global_pool"
        assert {"layer1", "layer2", "layer3", "layer4"} <= set(children)
    model = build_backbone("seresnext101_32x4d")
    assert model.num_features == 2048
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_local_checkpoint_loads_and_drops_the_classifier(tmp_path):
    source = build_backbone("resnet_tiny", seed=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 128)  # a timm checkpoint's classifier
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    loaded = build_backbone("resnet_tiny", checkpoint=str(tmp_path / "ckpt.pt"), seed=4)
    for (k, v), (_, w) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(v, w), k


def test_bad_model_name_and_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.name: unknown model 'resnet_tinyy'"):
        build_backbone("resnet_tinyy")
    with pytest.raises(FileNotFoundError, match="model.checkpoint: no such file"):
        build_backbone("resnet_tiny", checkpoint=str(tmp_path / "missing.pt"))
    torch.save(build_backbone("resnet_small").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        build_backbone("resnet_tiny", checkpoint=str(tmp_path / "other.pt"))
