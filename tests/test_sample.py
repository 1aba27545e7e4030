"""The generation CLI end to end with tiny models: determinism, caching, decoders, errors."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from at1_jax.generate import cli
from at1_jax.generate import pipeline as sample
from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser, DenoiserConfig

TINY = DenoiserConfig(
    latent_size=8, width=64, depth=1, noise_embed_dims=16, text_dim=24, head_dim=32, cross_heads=2
)


def save_tiny_denoiser(path, cfg=TINY, seed=0) -> str:
    """A weights folder with a random tiny denoiser (text_dim 24 = the tiny CLIP's projection)."""
    model = Denoiser(cfg, nnx.Rngs(seed))
    weights.save(str(path), cfg, weights.model_arrays(model))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_denoiser(tmp_path_factory.mktemp("ckpt") / "w")


def _args(ckpt, tiny_models, out, cache, *extra):
    return [
        "--checkpoint", ckpt,
        "--prompt", "a red square",
        "--prompt", "a blue circle",
        "--num", "2",
        "--steps", "3",
        "--batch-size", "3",  # 4 images: one full batch and one padded one
        "--text-encoder", f"clip={tiny_models.clip}",
        "--vae", tiny_models.vae,
        "--out", str(out),
        "--cache-dir", str(cache),
        *extra,
    ]  # fmt: skip


def _pngs(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".png")}


def test_same_seed_same_bytes_other_seed_other_images(ckpt, tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "a", cache)) == 0
    first = _pngs(tmp_path / "a")
    assert sorted(first) == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
    img = np.asarray(Image.open(tmp_path / "a" / "00000.png"))
    assert img.shape == (64, 64, 3) and img.std() > 0  # 8×8 latents, VAE upsamples ×8

    # Second run: embeddings come from the cache (the encoder must not even be constructed).
    import data_prep.text_encoders as te

    def no_encoder(*a, **k):
        raise AssertionError("text encoder loaded although every prompt is cached")

    monkeypatch.setattr(te, "TextEncoder", no_encoder)
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "b", cache)) == 0
    assert _pngs(tmp_path / "b") == first

    assert cli.main(_args(ckpt, tiny_models, tmp_path / "c", cache, "--seed", "12")) == 0
    other = _pngs(tmp_path / "c")
    # Image k uses seed + k: seed 12's first image is seed 11's second one, bytes and all.
    assert other["00000.png"] == first["00001.png"]
    assert other["00001.png"] != first["00001.png"]

    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert [r["seed"] for r in settings["images"]] == [11, 12, 11, 12]
    assert [r["prompt"] for r in settings["images"]][1:3] == ["a red square", "a blue circle"]
    assert settings["sampler"]["steps"] == 3 and settings["decode"]["latent_scale"] == 8.0


def test_rerun_into_a_previous_output_replaces_exactly_what_it_wrote(ckpt, tiny_models, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert cli.main(_args(ckpt, tiny_models, out, cache)) == 0  # 2 prompts × 2 images
    first = _pngs(out)
    assert cli.main(_args(ckpt, tiny_models, out, cache, "--num", "1", "--decode", "none")) == 0
    # Nothing stale: 00002.png and 00003.png of the first run are gone.
    expected = ["00000.png", "00001.png", "grid.png", "latents.npy", "settings.json"]
    assert sorted(os.listdir(out)) == expected
    settings = json.loads((out / "settings.json").read_text())
    assert [r["file"] for r in settings["images"]] == ["00000.png", "00001.png"]
    assert sorted([*settings["files"], "settings.json"]) == expected and settings["complete"]
    assert _pngs(out)["00000.png"] != first["00000.png"]  # a latent preview now, not the VAE's

    # settings.json from before it had "files" (images, grid.png, latents.npy) is still ours.
    del settings["files"], settings["complete"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert cli.main(_args(ckpt, tiny_models, out, cache, "--num", "1")) == 0
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid.png", "settings.json"]


def test_out_holding_files_this_tool_did_not_write_is_refused(ckpt, tiny_models, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(_args(ckpt, tiny_models, out, cache)) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--out" in err and "settings.json" in err
    assert sorted(os.listdir(out)) == ["notes.txt"] and not cache.exists()  # before any work

    # A previous output plus a file of the user's: still refused, nothing removed.
    (out / "notes.txt").unlink()
    assert cli.main(_args(ckpt, tiny_models, out, cache, "--num", "1")) == 0
    before = sorted(os.listdir(out))
    (out / "00007.png").write_bytes(b"someone else's image")
    assert cli.main(_args(ckpt, tiny_models, out, cache, "--num", "1")) == 2
    assert "00007.png" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted([*before, "00007.png"])

    (tmp_path / "file").write_text("x")
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "file", cache)) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\ufeff# held-out prompts\n\n  a red square  \n   # indented comment\na #2 pencil\n"
    )
    assert cli.read_prompts(["first"], str(path)) == ["first", "a red square", "a #2 pencil"]
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        cli.read_prompts(None, str(path))


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_negative_guidance_is_refused(ckpt, tmp_path, capsys, value):
    argv = [
        "--checkpoint",
        ckpt,
        "--prompt",
        "x",
        "--guidance",
        value,
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "guidance must be a finite number >= 0" in err and value in err
    assert not (tmp_path / "o").exists()


def test_batch_size_and_prompt_position_do_not_change_an_image(ckpt, tiny_models, tmp_path):
    """The same (prompt, seed) gives the same image in any batch layout, up to float noise."""
    pipe = sample.Pipeline(
        ckpt, text_encoder=f"clip={tiny_models.clip}", decode="none", cache_dir=str(tmp_path)
    )
    cfg = sample.SamplerConfig(steps=3)
    _, a = pipe.generate(["a dog", "a cat", "a tree"], [5, 6, 7], cfg)
    pipe2 = sample.Pipeline(
        ckpt,
        text_encoder=f"clip={tiny_models.clip}",
        decode="none",
        batch_size=2,
        cache_dir=str(tmp_path),
    )
    _, b = pipe2.generate(["a tree", "a cat"], [7, 6], cfg)
    # Different batch shapes compile to different matmul tilings: fp32 reassociation only.
    np.testing.assert_allclose(b, a[[2, 1]], atol=1e-5, rtol=1e-5)


def test_torch_decode_matches_jax_decode(ckpt, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "j", cache)) == 0
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "t", cache, "--decode", "torch")) == 0
    for name in ("00000.png", "00003.png"):
        j = np.asarray(Image.open(tmp_path / "j" / name), np.int16)
        t = np.asarray(Image.open(tmp_path / "t" / name), np.int16)
        # Same latents; the decoders agree to ~1e-5 (tests/test_vae.py), so uint8 rounding
        # can differ by at most one level where a value sits on a rounding boundary.
        assert np.abs(j - t).max() <= 1


def test_pixel_space_model_decodes_by_range_mapping(tiny_models, tmp_path):
    cfg = DenoiserConfig(**{**TINY.__dict__, "latent_channels": 3, "latent_size": 16})
    ckpt = save_tiny_denoiser(tmp_path / "pix", cfg)
    (tmp_path / "pix" / "manifest.json").write_text(
        json.dumps(
            {
                "autoencoder": {"kind": "pixel", "model": "pixel"},
                "text_encoders": [{"name": "clip", "kind": "clip", "model": tiny_models.clip}],
                "arrays": {"clip_pooled": {"shape": [24], "dtype": "float16"}},
            }
        )
    )
    # No --vae / --text-encoder: both come from the manifest next to the weights.
    argv = ["--checkpoint", ckpt, "--prompt", "a cat", "--num", "1", "--steps", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 0
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["decode"]["vae"] == "pixel"
    assert settings["text_encoder"] == f"clip={tiny_models.clip}"
    pipe = sample.Pipeline(ckpt, decode="none", cache_dir=str(tmp_path))
    _, x0 = pipe.generate(["a cat"], [11], sample.SamplerConfig(steps=2))
    want = np.round(np.clip(x0[0] / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "00000.png")), want)


def test_cli_errors_name_the_missing_files(ckpt, tiny_models, tmp_path, capsys):
    out = tmp_path / "never"

    def run(*argv):
        code = cli.main([*argv, "--prompt", "x", "--out", str(out), "--cache-dir", str(tmp_path)])
        return code, capsys.readouterr().err

    code, err = run("--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err and "config.json" in err and "at1_jax.convert" in err

    code, err = run("--checkpoint", ckpt, "--text-encoder", f"clip={tmp_path}/no_clip")
    assert (
        code == 2 and "text encoder folder" in err and "no_clip" in err and "--text-encoder" in err
    )

    # The default CLIP hub id is not cached here and HF_HUB_OFFLINE=1 (conftest).
    code, err = run("--checkpoint", ckpt, "--vae", tiny_models.vae)
    assert code == 2 and "openai/clip-vit-large-patch14" in err and "HF_HUB_OFFLINE" in err

    clip = f"clip={tiny_models.clip}"
    code, err = run("--checkpoint", ckpt, "--text-encoder", clip, "--vae", str(tmp_path / "no_vae"))
    assert code == 2 and "VAE folder" in err and "diffusion_pytorch_model.safetensors" in err

    code, err = run("--checkpoint", ckpt, "--text-encoder", clip)  # default SDXL VAE, offline
    assert code == 2 and "madebyollin/sdxl-vae-fp16-fix" in err and "--vae" in err

    code, err = run("--checkpoint", ckpt, "--text-encoder", "t5=google/t5")
    assert code == 2 and "pooled" in err
    assert not out.exists()  # every error came before any work


def test_progress_bar_shows_rate_and_no_progress_silences_it(ckpt, tiny_models, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli.main(_args(ckpt, tiny_models, tmp_path / "p", cache)) == 0
    err = capsys.readouterr().err
    assert "sampling: 100%" in err and "4/4" in err and "img/s" in err
    assert cli.main([*_args(ckpt, tiny_models, tmp_path / "q", cache), "--no-progress"]) == 0
    assert "sampling" not in capsys.readouterr().err
