"""Run configuration: files, overrides, validation, saving."""

import dataclasses
import json

import pytest

from at1_jax.model.presets import PRESETS
from at1_jax.train import config

CONFIGS = ["configs/cpu.py", "configs/at1.py", "configs/tld_101m.py"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load_and_validate(path):
    cfg = config.load_file(path)
    config.validate(cfg)
    assert config.from_dict(json.loads(config.to_json(cfg))) == cfg


def test_shipped_configs_use_the_published_models():
    assert (
        dataclasses.replace(config.load_file("configs/at1.py").model, dtype="float32")
        == PRESETS["at1"]
    )
    tld = config.load_file("configs/tld_101m.py")
    assert dataclasses.replace(tld.model, dtype="float32") == PRESETS["tld-101m"]
    assert (tld.objective.beta_a, tld.objective.beta_b, tld.data.batch_size) == (1.0, 2.5, 256)


def test_overrides_of_every_kind():
    cfg = config.apply_overrides(
        config.load_file("configs/cpu.py"),
        [
            "--config.optim.lr=1e-4",
            "--config.steps=7",
            "--config.checkpoint.async_save=false",
            "--config.data.path=s3://bucket/data",
            "--config.model=at1",
            "--config.model.depth=2",
            '--config.mesh.rules=[["batch", ["data", "fsdp"]], ["embed", "fsdp"]]',
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.steps == 7 and cfg.checkpoint.async_save is False
    assert cfg.data.path == "s3://bucket/data"
    assert cfg.model == dataclasses.replace(PRESETS["at1"], depth=2)
    assert cfg.mesh.rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optim.lrr=1", "unknown field 'lrr'"),
        ("--config.steps=many", "cannot parse 'many' as int"),
        ("--config.checkpoint.async_save=maybe", "cannot parse 'maybe' as bool"),
        ("--config.model=at7", "unknown model preset 'at7'"),
        ("--config.model.width=100", "model.width=100 is not a multiple of model.head_dim"),
        ("--config.optim=1", "set the fields of section 'optim' one by one"),
        ("optim.lr=1", "must look like --config.section.field=value"),
    ],
)
def test_bad_overrides_name_the_flag(override, message):
    with pytest.raises(config.ConfigError) as err:
        config.apply_overrides(config.load_file("configs/cpu.py"), [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optim.lr=0", "config.optim.lr must be > 0, got 0.0"),
        ("--config.optim.schedule=linear", "config.optim.schedule must be one of"),
        ("--config.data.path=", "config.data.path must be a dataset folder"),
        (
            "--config.optim.grad_accum=5",
            "config.data.batch_size must be a multiple of optim.grad_accum, got 32",
        ),
        ("--config.mesh.fsdp=0", "config.mesh.fsdp must be >= 1 or -1, got 0"),
        ("--config.optim.ema_decay=1.0", "config.optim.ema_decay must be in [0, 1), got 1.0"),
    ],
)
def test_validation_names_field_and_value(override, message):
    cfg = config.apply_overrides(config.load_file("configs/cpu.py"), [override])
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    assert message in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_file(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match=r"must define get_config\(\)"):
        config.load_file(str(tmp_path / "empty.py"))
