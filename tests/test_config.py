"""Run configuration: files, overrides, validation, saving."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from at1_jax.model.denoiser import Denoiser
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
        ("--config.optim.lrr=1", "--config.optim.lrr=1: unknown field 'lrr' in config.optim"),
        ("--config.steps=many", "--config.steps=many: cannot parse 'many' as int"),
        ("--config.steps=1.5", "--config.steps=1.5: cannot parse '1.5' as int"),
        (
            "--config.checkpoint.async_save=maybe",
            "--config.checkpoint.async_save=maybe: cannot parse 'maybe' as bool: "
            "expected true or false",
        ),
        ("--config.model.cross_heads=x", "cross_heads=x: cannot parse 'x' as int | None"),
        ("--config.mesh.rules=[[1", "rules=[[1: cannot parse '[[1' as tuple[tuple[str"),
        ("--config.model=at7", "--config.model=at7: unknown model preset 'at7'; known: at1"),
        ("--config.model.width=200", "model.width=200 does not split into 3 equal heads"),
        ("--config.objective.beta_a=0", "ObjectiveConfig.beta_a must be a finite number > 0"),
        ("--config.optim=1", "--config.optim=1: set the fields of section 'optim' one by one"),
        ("--config.steps.x=1", "--config.steps.x=1: config.steps has no sub-fields"),
        ("--config.checkpoint_dir=x", "unknown field 'checkpoint_dir' in config (known: name,"),
        ("optim.lr=1", "must look like --config.section.field=value"),
        ("--config.steps", "must look like --config.section.field=value"),
    ],
)
def test_bad_overrides_name_the_flag(override, message, capsys):
    with pytest.raises(config.ConfigError) as err:
        config.apply_overrides(config.load_file("configs/cpu.py"), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert capsys.readouterr() == ("", "")  # tyro's own error box is replaced, not printed


def test_overrides_follow_the_documented_syntax():
    base = config.load_file("configs/cpu.py")
    cfg = config.apply_overrides(
        base,
        [
            "--config.log.tensorboard=FALSE",  # booleans in any case
            "--config.checkpoint.async-save=False",  # tyro accepts - for _
            "config.steps=3",
            "--config.steps=4",  # a later override wins
            "--config.name=no",  # strings stay strings: no YAML-style coercion
            "--config.run_dir=123",
            "--config.model.cross_heads=2",
            "--config.mesh.rules=(('batch', 'data'), ('embed', None))",
        ],
    )
    assert (cfg.log.tensorboard, cfg.checkpoint.async_save, cfg.steps) == (False, False, 4)
    assert (cfg.name, cfg.run_dir, cfg.model.cross_heads) == ("no", "123", 2)
    assert cfg.mesh.rules == (("batch", "data"), ("embed", None))
    assert (
        config.apply_overrides(cfg, ["--config.model.cross_heads=None"]).model.cross_heads is None
    )
    # Untouched sections and fields keep the config file's values.
    assert (cfg.optim, cfg.data, cfg.objective) == (base.optim, base.data, base.objective)
    assert cfg.model == dataclasses.replace(base.model, cross_heads=2)
    assert config.from_dict(json.loads(config.to_json(cfg))) == cfg


def test_a_model_preset_applies_in_command_line_order():
    base = config.load_file("configs/cpu.py")
    before = config.apply_overrides(base, ["--config.model.depth=2", "--config.model=at1"])
    after = config.apply_overrides(base, ["--config.model=at1", "--config.model.depth=2"])
    assert before.model == PRESETS["at1"]
    assert after.model == dataclasses.replace(PRESETS["at1"], depth=2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--config.model.width=200", "--config.model.head_dim=40"],
        ["--config.model.head_dim=40", "--config.model.width=200"],
    ],
)
def test_nested_overrides_are_checked_together(overrides):
    """A section is rebuilt once from all its overrides: either order alone would be invalid."""
    base = config.load_file("configs/cpu.py")
    cfg = config.apply_overrides(base, overrides)
    config.validate(cfg)
    assert cfg.model == dataclasses.replace(base.model, width=200, head_dim=40)
    # tld-tiny has cross_heads=None: cross-attention follows the self-attention head count.
    assert (cfg.model.self_heads, cfg.model.n_cross_heads) == (5, 5)
    assert cfg.model.num_tokens == base.model.num_tokens
    m = cfg.model
    x = jax.ShapeDtypeStruct((2, m.latent_channels, m.latent_size, m.latent_size), jnp.float32)
    sigma = jax.ShapeDtypeStruct((2, 1), jnp.float32)
    text = jax.ShapeDtypeStruct((2, m.text_dim), jnp.float32)
    out = jax.eval_shape(lambda x, s, t: Denoiser(m, nnx.Rngs(0))(x, s, t), x, sigma, text)
    assert out.shape == x.shape  # the network builds and traces with the overridden sizes
    with pytest.raises(config.ConfigError, match=r"model.width=200 does not split into 3 equal"):
        config.apply_overrides(base, ["--config.model.width=200"])


def test_cli_turns_a_bad_override_into_one_error_line(capsys):
    from at1_jax.train import trainer

    code = trainer.main(["--config", "configs/cpu.py", "--config.optim.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --config.optim.lrr=1: unknown field 'lrr' in config.optim")
    assert err.count("\n") == 1


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
        (
            "--config.mesh.grad_reduce=ring",
            "config.mesh.grad_reduce must be auto or flat or xla, got 'ring'",
        ),
        (
            "--config.checkpoint.retry_seconds=0",
            "config.checkpoint.retry_seconds must be > 0 (seconds), got 0.0",
        ),
        ("--config.checkpoint.retry_seconds=inf", "retry_seconds must be a finite number"),
        ("--config.optim.ema_decay=1.0", "config.optim.ema_decay must be in [0, 1), got 1.0"),
        (
            '--config.mesh.rules=[["batch", "model"]]',
            "config.mesh.rules must be (logical axis, mesh axis or tuple of them or None) pairs "
            "over ('data', 'fsdp', 'tensor'), got (('batch', 'model'),)",
        ),
        ('--config.mesh.rules=[["batch", 3]]', "got (('batch', 3),)"),
        ('--config.mesh.rules=["batch"]', "config.mesh.rules must be"),
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
