"""Config schema, YAML inheritance, overrides and the reference code's flags."""

from pathlib import Path

import pytest

from cssr_dist.cli import build_parser, config_from_args, main
from cssr_dist.config import ConfigError, load_config, load_yaml_tree
from cssr_dist.data.openood import IMAGENET_LISTS

ROOT = Path(__file__).resolve().parent.parent
PAPER = [f"configs/{ds}/{m}.yaml" for ds in ("cifar10", "svhn", "tinyimagenet", "cifar_plus10", "cifar_plus50")
         for m in ("linear", "pcssr", "rcssr")]


@pytest.mark.parametrize("path", PAPER + ["configs/smoke.yaml", "configs/fashion_mnist/rcssr.yaml",
                                          "configs/mnist/rcssr.yaml", "configs/fashion_mnist/linear.yaml"])
def test_every_config_loads(path):
    cfg = load_config(ROOT / path)
    assert cfg.model.head in ("linear", "pcssr", "rcssr")
    assert cfg.run.name


@pytest.mark.parametrize("ds,backbone,size,epochs,milestones", [
    ("cifar10", "wrn40_4", 32, 200, [120.0, 190.0]),
    ("svhn", "wrn40_4", 32, 200, [120.0, 190.0]),
    ("tinyimagenet", "cifar_resnet18", 64, 235, [150.0, 225.0]),
])
def test_paper_recipes(ds, backbone, size, epochs, milestones):
    cfg = load_config(ROOT / f"configs/{ds}/rcssr.yaml")
    assert (cfg.model.backbone, cfg.data.image_size, cfg.schedule.epochs) == (backbone, size, epochs)
    assert cfg.schedule.milestones == milestones
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.4, 0.0, 5e-4)
    assert cfg.data.batch_size == 128 and cfg.model.gamma == 0.1 and cfg.model.latent_dim == 64
    assert cfg.schedule.warmup_epochs == (1 if ds == "tinyimagenet" else 0)


@pytest.mark.parametrize("name, backbone, head", [("openood_rcssr", "resnet18.tv_in1k", "rcssr"),
                                                  ("openood_rcssr_r50", "resnet50.tv_in1k", "rcssr"),
                                                  ("openood_linear", "resnet18.tv_in1k", "linear"),
                                                  ("openood_linear_r50", "resnet50.tv_in1k", "linear")])
def test_openood_imagenet_configs_are_openood_v15s_benchmark(name, backbone, head):
    """ID test = test_imagenet.txt's shards; near SSB-hard, NINCO; far iNaturalist, Textures, OpenImage-O
    (the roles of data/openood.py's table, which make_shards checks the lists against)."""
    cfg = load_config(ROOT / "configs" / "imagenet" / f"{name}.yaml")
    assert (cfg.model.backbone, cfg.model.head, cfg.data.dataset, cfg.data.split_family) == \
        (backbone, head, "imagenet", "none")
    assert (cfg.data.shards.train, cfg.data.shards.test) == ("imagenet-train", "openood-imagenet-test")
    roles = {f"test_{e.name}.txt": e.group for e in cfg.data.ood}
    assert roles == {f: r.role for f, r in IMAGENET_LISTS.items() if r.role in ("near", "far")}
    assert [e.shards for e in cfg.data.ood] == [f"openood-{e.name}" for e in cfg.data.ood]


def test_method_heads():
    assert load_config(ROOT / "configs/cifar10/pcssr.yaml").model.head == "pcssr"
    lin = load_config(ROOT / "configs/cifar10/linear.yaml").model
    assert (lin.head, lin.gamma) == ("linear", 1.0)


def test_inherit_merges_deeply(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  batch_size: 7\n  root: x\nmodel:\n  head: pcssr\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\ndata:\n  root: y\n")
    tree = load_yaml_tree(tmp_path / "b.yaml")
    assert tree == {"data": {"batch_size": 7, "root": "y"}, "model": {"head": "pcssr"}}


def test_inherit_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml_tree(tmp_path / "a.yaml")


def test_overrides_are_typed():
    cfg = load_config(None, ["data.batch_size=32", "optim.lr=1", "schedule.milestones=[2,3]", "data.known=null"])
    assert cfg.data.batch_size == 32 and isinstance(cfg.optim.lr, float) and cfg.schedule.milestones == [2.0, 3.0]


@pytest.mark.parametrize("text,value", [("5e-4", 5e-4), ("1E-3", 1e-3), ("-2.5e+2", -250.0), (".5", 0.5)])
def test_floats_as_users_write_them(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads `5e-4` as a string; every float field takes it, from an override,
    --configupdate, a list item or a YAML file, and the value is the number written."""
    cfg = load_config(None, [f"optim.weight_decay={text}", f"data.mean=[{text}]", f"optim.grad_clip={text}"])
    assert (cfg.optim.weight_decay, cfg.data.mean, cfg.optim.grad_clip) == (value, [value], value)
    args = build_parser().parse_args(["--configupdate", f"optim.lr:{text}", "--print-config"])
    assert config_from_args(args).optim.lr == value
    (tmp_path / "c.yaml").write_text(f"optim:\n  weight_decay: {text}\n")
    assert load_config(tmp_path / "c.yaml").optim.weight_decay == value


@pytest.mark.parametrize("override,message", [
    ("optim.weight_decay=5e-4x", "'optim.weight_decay' must be float, got '5e-4x'"),
    ("optim.lr=e-4", "'optim.lr' must be float"),
    ("data.batch_size=5e-4", "'data.batch_size' must be int"),
    ("data.batchsize=3", "unknown config key 'data.batchsize'.*did you mean 'data.batch_size'"),
    ("modle.head=rcssr", "unknown config key 'modle'.*did you mean 'model'"),
    ("model.head=rcsr", "'model.head' = 'rcsr' is not valid; did you mean 'rcssr'"),
    ("optim.lr=fast", "'optim.lr' must be float"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("schedule.epochs", "not of the form key=value"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"optim.momentun.*bad.yaml.*optim.momentum"):
        load_config(bad)


def test_reference_flags_map_onto_config(tmp_path):
    args = build_parser().parse_args([
        "--config", str(ROOT / "configs/cifar10/rcssr.yaml"), "--ds", "exps/cifar10/spl_b.json",
        "--save", "r1", "--method", "cssr_ft", "--configupdate", "optim.lr:0.01,data.batch_size:16",
        "--test_interval", "5", "schedule.epochs=3"])
    cfg = config_from_args(args)
    assert cfg.data.split_file == "exps/cifar10/spl_b.json"
    assert (cfg.run.name, cfg.run.method, cfg.model.freeze_backbone) == ("r1", "cssr_ft", True)
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.eval.test_interval, cfg.schedule.epochs) == (0.01, 16, 5, 3)


def test_print_config_exits_zero(capsys):
    assert main(["--config", str(ROOT / "configs/smoke.yaml"), "--print-config", "run.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "name: smoke" in out


def test_print_config_shows_the_backbones_own_normalisation(capsys):
    """load_config leaves null data.mean/std/image_size to the backbone (config.py knows no model
    registry); --print-config shows them resolved, as the run's config.yaml will."""
    from cssr_dist.config import load_config

    assert load_config(ROOT / "configs/imagenet/rcssr.yaml").data.image_size is None
    assert main(["--config", str(ROOT / "configs/imagenet/rcssr.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "image_size: 224" in out and "test_resize: 256" in out and "- 0.485" in out


def test_print_config_shows_only_the_ood_fields_the_format_reads(capsys, tmp_path):
    """A shard OOD set shows no source/root, a folder OOD set no shards: fields the format never
    reads are left out while at their defaults, so the text loads back as the same config."""
    import yaml

    from cssr_dist.config import to_dict
    from cssr_dist.engine.run_folder import experiment_fingerprint

    resolved = ["data.image_size=224", "data.test_resize=256", "data.mean=[0.485,0.456,0.406]",
                "data.std=[0.229,0.224,0.225]"]  # --print-config shows the backbone's own, resolved
    folders = "data.ood=[{name: textures, source: oodfolder, root: /data/dtd}]"
    for fmt, extra, shown, hidden in (("shards", [], {"shards"}, {"source", "root"}),
                                      ("native", [folders], {"source", "root"}, {"shards"})):
        args = [f"data.format={fmt}", *extra]
        assert main(["--config", str(ROOT / "configs/imagenet/rcssr.yaml"), "--print-config", *args]) == 0
        out = capsys.readouterr().out
        entries = yaml.safe_load(out)["data"]["ood"]
        assert entries and all(shown <= set(e) and not hidden & set(e) for e in entries), entries
        (tmp_path / "shown.yaml").write_text(out)
        assert load_config(tmp_path / "shown.yaml") == load_config(ROOT / "configs/imagenet/rcssr.yaml",
                                                                   args + resolved)
        # cssr-collect groups runs by the fingerprint of their config.yaml: the same as of the full config
        full = to_dict(load_config(tmp_path / "shown.yaml"))
        assert experiment_fingerprint(yaml.safe_load(out)) == experiment_fingerprint(full)


def test_gpu_flag_is_explained(capsys):
    assert main(["--gpu", "0", "--print-config"]) == 0
    assert "Accelerate chooses devices" in capsys.readouterr().err


def test_cli_error_is_one_line(capsys):
    assert main(["--print-config", "model.head=foo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 'model.head'")


def test_every_key_is_documented():
    """Each field carries its help beside it (config.option); none may be left empty."""
    from cssr_dist.config_help import _rows
    from cssr_dist.config import CHOICES, Config

    undocumented = [row[0] for row in _rows(Config, "") if not row[3] and row[0] not in CHOICES]
    assert not undocumented, undocumented


def test_readme_config_reference_is_current():
    from cssr_dist.config_help import reference_table

    assert reference_table() in (ROOT / "README.md").read_text(), "regenerate README's config reference"
