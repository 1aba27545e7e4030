"""PyTorch TLD/AT-1 checkpoints ↔ this project's weights: parity, round trips, errors."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as ref
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file
from test_model_card import training_meta

from at1_jax import convert as convert_cli
from at1_jax.checkpointing import model_card
from at1_jax.model import torch_names as convert
from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.presets import PRESETS

SMALL = dict(c=4, size=8, p=2, e=128, depth=2, noise_dims=64, text_dim=32)


def _reference(block, seed=0, **kw):
    torch.manual_seed(seed)
    args = {**SMALL, "cross_heads": 4 if block == "legacy" else None, "block": block, **kw}
    model = ref.Denoiser(**args).eval()
    with torch.no_grad():  # move norms off (1, 0) so a swapped scale/bias cannot pass.
        for name, p in model.named_parameters():
            if "norm" in name or "patchify_and_embed.2" in name or "patchify_and_embed.4" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs(batch=3, size=8, text_dim=32):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, size, size, generator=g),
        torch.rand(batch, 1, generator=g),
        torch.randn(batch, text_dim, generator=g),
    )


def _jax_out(model, x, s, t):
    return np.asarray(model(*(jnp.asarray(a.numpy()) for a in (x, s, t))))


# Width 96 is one head of 96 and 160 two heads of 80 in TLD (heads = width // 64).
@pytest.mark.parametrize("width", [128, 96, 160])
@pytest.mark.parametrize("block", ["prenorm", "legacy"])
def test_converted_weights_reproduce_the_pytorch_reference(block, width, tmp_path):
    model = _reference(block, e=width)
    torch.save(model.state_dict(), tmp_path / "ck.pth")
    cfg = convert.import_checkpoint(str(tmp_path / "ck.pth"), str(tmp_path / "w"), block)
    assert (cfg.block, cfg.width, cfg.depth, cfg.noise_embed_dims) == (block, width, 2, 64)
    assert (cfg.self_heads, cfg.head_size) == {128: (2, 64), 96: (1, 96), 160: (2, 80)}[width]
    x, s, t = _inputs()
    with torch.no_grad():
        expected = model(x, s, t).numpy()
    got = _jax_out(weights.load(str(tmp_path / "w")), x, s, t)
    # fp32 both sides, same math in another order: sums of ≤512 terms each lose ~sqrt(512)·6e-8
    # relative, compounded through 2 blocks and 5 norms: ≲1e-5 of the output scale.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


def test_a_file_that_does_not_record_its_variant_needs_one(tmp_path, capsys):
    torch.save(_reference("prenorm").state_dict(), tmp_path / "ck.pth")
    with pytest.raises(ValueError, match="block variant is not recorded") as err:
        convert.import_checkpoint(str(tmp_path / "ck.pth"), str(tmp_path / "w"))
    # The message says how to tell: the reference code's two forms of DecoderBlock.forward.
    for text in (
        "--variant legacy",
        "x = self.norm1(self.self_attention(x) + x)",
        "--variant prenorm",
        "x = self.self_attention(self.norm1(x)) + x",
        "at1_jax.convert export",
    ):
        assert text in str(err.value)
    assert convert_cli.main(["import", str(tmp_path / "ck.pth"), str(tmp_path / "w")]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {tmp_path / 'ck.pth'}: the block variant") and not out.out
    assert not (tmp_path / "w").exists()


def _random_weights_folder(cfg, directory, seed=0) -> None:
    """A weights folder with distinct random values in every array (a swap cannot pass)."""
    model = nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    arrays = {
        weights.path_key(path): rng.random(var.shape, dtype=np.float32)
        for path, var in nnx.to_flat_state(nnx.state(model))
    }
    weights.save(str(directory), cfg, arrays)


ROUND_TRIPS = {
    **PRESETS,
    "at1, 8 cross heads": dataclasses.replace(PRESETS["at1"], cross_heads=8),
    "tld-tiny, 2 cross heads": dataclasses.replace(PRESETS["tld-tiny"], cross_heads=2),
    "width 96, head_dim 32, bf16": dataclasses.replace(
        PRESETS["tld-tiny"], width=96, head_dim=32, dtype="bfloat16"
    ),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n == "xl-600m" else []) for n in ROUND_TRIPS],
)
def test_export_then_import_gives_the_same_model(name, tmp_path, capsys):
    cfg = ROUND_TRIPS[name]
    _random_weights_folder(cfg, tmp_path / "a")
    exported = str(tmp_path / "a.safetensors")
    assert convert_cli.main(["export", str(tmp_path / "a"), exported]) == 0
    with safe_open(exported, framework="np") as f:
        assert json.loads(f.metadata()[convert.CONFIG_METADATA]) == dataclasses.asdict(cfg)
    # No --variant, no --cross-heads: the file says what it is.
    assert convert_cli.main(["import", exported, str(tmp_path / "b")]) == 0
    assert f"preset: {name if name in PRESETS else 'custom'}" in capsys.readouterr().out
    assert weights.load_config(str(tmp_path / "b")) == cfg
    a_file, b_file = (str(tmp_path / d / weights.PARAMS_FILE) for d in "ab")
    with safe_open(a_file, framework="np") as a, safe_open(b_file, framework="np") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():  # one array at a time: xl-600m is 2.4 GB in float32.
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


def test_flags_and_shapes_that_contradict_the_recorded_config_are_refused(tmp_path):
    cfg = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, text_dim=32, cross_heads=8)
    _random_weights_folder(cfg, tmp_path / "a")
    exported = str(tmp_path / "a.safetensors")
    convert.export_checkpoint(str(tmp_path / "a"), exported)
    out = str(tmp_path / "b")
    with pytest.raises(ValueError, match=r"--variant legacy contradicts .* block='prenorm'"):
        convert.import_checkpoint(exported, out, "legacy")
    with pytest.raises(ValueError, match=r"--cross-heads 4 contradicts .* cross_heads=8"):
        convert.import_checkpoint(exported, out, cross_heads=4)
    assert convert.import_checkpoint(exported, out, "prenorm", cross_heads=8) == cfg  # agreeing

    sd = load_file(exported)
    for raw, message in [
        (json.dumps({**dataclasses.asdict(cfg), "width": 256}), "width: recorded 256, weights 128"),
        ("{not json", "not JSON"),
        (json.dumps({**dataclasses.asdict(cfg), "width": "wide"}), "invalid model config"),
        (json.dumps({**dataclasses.asdict(cfg), "colour": 1}), r"unknown .* \['colour'\]"),
    ]:
        save_file(sd, str(tmp_path / "t.safetensors"), {convert.CONFIG_METADATA: raw})
        with pytest.raises(ValueError, match=message) as err:
            convert.import_checkpoint(str(tmp_path / "t.safetensors"), str(tmp_path / "c"))
        assert str(tmp_path / "t.safetensors") in str(err.value)
    assert not (tmp_path / "c").exists()


def test_wrong_variant_gives_different_outputs(tmp_path):
    model = _reference("legacy")
    torch.save(model.state_dict(), tmp_path / "ck.pth")
    convert.import_checkpoint(
        str(tmp_path / "ck.pth"), str(tmp_path / "w"), "prenorm", cross_heads=4
    )
    x, s, t = _inputs()
    with torch.no_grad():
        expected = model(x, s, t).numpy()
    got = _jax_out(weights.load(str(tmp_path / "w")), x, s, t)
    assert np.abs(got - expected).max() > 1e-2


def test_fp16_wrapped_compiled_checkpoint_loads(tmp_path):
    model = _reference("legacy")
    sd = {f"_orig_mod.{k}": v.half() for k, v in model.state_dict().items()}
    torch.save({"model_ema": sd, "step": 1200, "optimizer": {"lr": 3e-4}}, tmp_path / "ck.pt")
    convert.import_checkpoint(str(tmp_path / "ck.pt"), str(tmp_path / "w"), "legacy")
    x, s, t = _inputs()
    half = ref.Denoiser(**SMALL, cross_heads=4, block="legacy").eval()
    half.load_state_dict({k[len("_orig_mod.") :]: v.float() for k, v in sd.items()})
    with torch.no_grad():
        expected = half(x, s, t).numpy()
    got = _jax_out(weights.load(str(tmp_path / "w")), x, s, t)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_safetensors_input_and_export_round_trip_is_exact(tmp_path):
    model = _reference("prenorm")
    torch_save_file(model.state_dict(), str(tmp_path / "ck.safetensors"))
    convert.import_checkpoint(str(tmp_path / "ck.safetensors"), str(tmp_path / "a"), "prenorm")
    convert.export_checkpoint(str(tmp_path / "a"), str(tmp_path / "back.safetensors"))
    exported = torch_load_file(str(tmp_path / "back.safetensors"))
    original = model.state_dict()
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k
    ref.Denoiser(**SMALL, block="prenorm").load_state_dict(exported)  # reference code loads it
    convert.import_checkpoint(str(tmp_path / "back.safetensors"), str(tmp_path / "b"), "prenorm")
    a = load_file(str(tmp_path / "a" / weights.PARAMS_FILE))
    b = load_file(str(tmp_path / "b" / weights.PARAMS_FILE))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cli_infers_the_preset_from_shapes(tmp_path, capsys):
    model = ref.Denoiser(c=4, size=16, p=2, e=128, depth=3, noise_dims=256, block="prenorm")
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    assert (
        convert_cli.main(
            ["import", str(tmp_path / "tiny.pth"), str(tmp_path / "w"), "--variant", "prenorm"]
        )
        == 0
    )
    assert "preset: tld-tiny" in capsys.readouterr().out
    assert weights.load_config(str(tmp_path / "w")) == PRESETS["tld-tiny"]


def test_missing_and_mis_shaped_keys_are_named(tmp_path):
    sd = {k: v.numpy() for k, v in _reference("legacy").state_dict().items()}
    missing = dict(sd)
    del missing["denoiser_trans_block.decoder_blocks.1.norm2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing: \['denoiser_trans_block.decoder_blocks.1.norm2.bias'\]"
    ):  # named before the variant is asked for.
        convert.import_checkpoint(str(tmp_path / "missing.safetensors"), str(tmp_path / "w"))
    bad = dict(sd)
    bad["denoiser_trans_block.decoder_blocks.0.mlp.mlp.3.bias"] = np.zeros(7, np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        ValueError, match=r"shape of blocks/0/mlp/fc2/bias: file has \(7,\), model needs \(128,\)"
    ):
        convert.import_checkpoint(str(tmp_path / "bad.safetensors"), str(tmp_path / "w"), "legacy")
    assert not (tmp_path / "w").exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    torch.save(_reference("legacy").state_dict(), tmp_path / "ck.pth")
    data = (tmp_path / "ck.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match="not a zip-format nor a readable legacy PyTorch checkpoint"
    ):
        convert.import_checkpoint(str(tmp_path / "cut.pth"), str(tmp_path / "w"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        convert.import_checkpoint(str(tmp_path / "cut.safetensors"), str(tmp_path / "w"))
    torch.save({"epoch": 3, "weights_here": {"a": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"no state_dict found.*--key"):
        convert.import_checkpoint(str(tmp_path / "other.pth"), str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"missing label_proj\.weight"):
        convert.import_checkpoint(
            str(tmp_path / "other.pth"), str(tmp_path / "w"), key="weights_here"
        )


def test_weights_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an at1-jax weights folder"):
        weights.load(str(tmp_path))
    cfg = dataclasses.asdict(PRESETS["tld-tiny"])
    (tmp_path / weights.CONFIG_FILE).write_text(__import__("json").dumps({**cfg, "colour": 1}))
    with pytest.raises(ValueError, match=r"unknown model config fields \['colour'\]"):
        weights.load(str(tmp_path))


def test_import_and_export_carry_the_model_card(tmp_path, capsys):
    # A plain PyTorch checkpoint: the card says what is not known.
    torch.save(_reference("prenorm").state_dict(), tmp_path / "ck.pth")
    args = ["import", str(tmp_path / "ck.pth"), str(tmp_path / "plain"), "--variant", "prenorm"]
    assert convert_cli.main(args) == 0
    card = model_card.read(str(tmp_path / "plain"))
    assert card["origin"] == {"kind": "imported", "from": str(tmp_path / "ck.pth")}
    assert card["model"]["architecture"] == dataclasses.asdict(
        weights.load_config(str(tmp_path / "plain"))
    )
    assert card["training"] is None and card["licenses"]["consumed"] is None
    assert f"model card: {card['summary']}" in capsys.readouterr().out
    assert (tmp_path / "plain" / model_card.MARKDOWN_FILE).is_file()
    # A trained folder's card travels in the exported file's header and beside it, and comes
    # back with the weights on import.
    cfg = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32)
    _random_weights_folder(cfg, tmp_path / "trained")
    trained = model_card.from_training_meta(training_meta())
    model_card.write(str(tmp_path / "trained"), trained)
    out = str(tmp_path / "t.safetensors")
    assert convert_cli.main(["export", str(tmp_path / "trained"), out]) == 0
    with safe_open(out, framework="np") as f:
        header = json.loads(f.metadata()[convert.CARD_METADATA])
    beside = json.loads((tmp_path / "t.model_card.json").read_text())
    assert header == beside and (tmp_path / "t.model_card.md").is_file()
    assert beside["origin"] == {
        "kind": "exported", "from": str(tmp_path / "trained"), "before": trained["origin"]
    }  # fmt: skip
    assert convert_cli.main(["import", out, str(tmp_path / "back")]) == 0
    back = model_card.read(str(tmp_path / "back"))
    for field in ("name", "training", "data", "licenses", "validation", "parent"):
        assert back[field] == trained[field], field
    assert back["origin"] == {"kind": "imported", "from": out, "before": beside["origin"]}
    assert back["summary"] == trained["summary"].replace(
        "; licences", f"; imported from {out}; licences"
    )
