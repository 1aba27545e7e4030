"""The evaluation CLI with tiny models: FID and CLIP score against independent recomputation."""

import json

import numpy as np
import pytest
import torch
from fixtures_models import make_tokenizer
from flax import nnx
from PIL import Image
from test_model_card import training_meta
from test_sample import save_tiny_denoiser
from test_validation import _reference

from at1_io.synthetic import make_dataset
from at1_jax.checkpointing import model_card
from at1_jax.decode import images
from at1_jax.evaluate import cli as evaluate
from at1_jax.evaluate import metrics, sweep
from at1_jax.model import weights
from at1_jax.train import data, validation

CAPTIONS = ["a red square", "a blue circle", "a small dog", "a large tree", "a cat", "the sky"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (text + vision) with tokenizer and image processor, saved offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip_full")
    tok = make_tokenizer()
    torch.manual_seed(5)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO captions file and 6 non-square reference images (ids deliberately unsorted)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k, caption in enumerate(CAPTIONS):
        image_id = 100 - k
        name = f"img_{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
        images.append({"id": image_id, "file_name": name})
        annotations.append({"image_id": image_id, "caption": caption})
        annotations.append({"image_id": image_id, "caption": "second caption, not used"})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def tiny_features(imgs: np.ndarray) -> np.ndarray:
    """A fixed random 8-d projection of 4×4 average-pooled pixels: a stand-in for Inception."""
    x = imgs.astype(np.float64) / 255.0
    n, h, w, c = x.shape
    pooled = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)
    proj = np.random.default_rng(42).standard_normal((pooled.shape[1], 8))
    return pooled @ proj


def _argv(tmp_path, tiny_models, tiny_clip, coco, ckpt, *extra):
    return [
        "--checkpoint", ckpt,
        "--captions", str(coco / "captions.json"),
        "--images", str(coco / "images"),
        "--num-images", "6",
        "--guidance", "1,6",
        "--steps", "2",
        "--batch-size", "4",
        "--chunk", "4",  # two chunks per guidance value: exercises running statistics
        "--text-encoder", f"clip={tiny_models.clip}",
        "--vae", tiny_models.vae,
        "--clip-model", tiny_clip,
        "--cache-dir", str(tmp_path / "cache"),
        "--out", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip


def test_sweep_report_matches_independent_metrics(tmp_path, tiny_models, tiny_clip, coco):
    ckpt = save_tiny_denoiser(tmp_path / "w")
    meta = training_meta()
    meta["config"]["model"] = json.loads((tmp_path / "w" / "config.json").read_text())
    model_card.write(ckpt, model_card.from_training_meta(meta))
    argv = _argv(tmp_path, tiny_models, tiny_clip, coco, ckpt, "--save-images")
    assert evaluate.main(argv, feature_extractor=tiny_features) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["guidance"] for r in report["rows"]] == [1.0, 6.0]
    [entry] = model_card.read(ckpt)["evaluations"]  # the results went into the card
    assert entry["kind"] == "fid_clip" and entry["results"]["rows"] == report["rows"]
    assert entry["results"]["num_images"] == 6 and entry["results"]["sampler"]["steps"] == 2
    assert report["num_images"] == 6 and report["image_size"] == 64

    # Recompute both metrics from the saved PNGs with independent code paths.
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok, proc = (
        AutoTokenizer.from_pretrained(tiny_clip),
        AutoImageProcessor.from_pretrained(tiny_clip),
    )
    ids = sorted(range(6), key=lambda k: 100 - k)  # COCO order: by image id
    captions = [CAPTIONS[k] for k in ids]
    refs = np.stack(
        [sweep.load_reference(str(coco / "images" / f"img_{100 - k}.png"), 64) for k in ids]
    )
    ref_stats = metrics.feature_stats(tiny_features(refs))
    fids = []
    for row in report["rows"]:
        gen = np.stack(
            [
                np.asarray(Image.open(tmp_path / "out" / f"g{row['guidance']:g}" / f"{i:05d}.png"))
                for i in range(6)
            ]
        )
        want_fid = metrics.frechet_distance(*metrics.feature_stats(tiny_features(gen)), *ref_stats)
        # Same float64 statistics, merged by batches vs at once: equal to ~1e-12 relative.
        assert row["fid"] == pytest.approx(want_fid, rel=1e-9, abs=1e-9)
        fids.append(row["fid"])
        with torch.no_grad():
            inputs = tok(captions, padding=True, return_tensors="pt")
            pixels = proc(images=list(gen), return_tensors="pt")["pixel_values"]
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=pixels,
            )
            cos = torch.diagonal(out.logits_per_image).numpy() / model.logit_scale.exp().item()
        # logits = exp(logit_scale)·cos in fp32: recovering cos costs a few ulp.
        assert row["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-4)
    assert fids[0] != fids[1]  # guidance changes the images
    sheet = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    cell = images.SHEET_MIN_CELL // 64 * 64  # 64-px images, upscaled to at least 128
    assert sheet.shape[1] == 8 + 6 * (cell + 8)  # a row of 6 labelled images per guidance value
    assert sheet.shape[0] > 30 + 2 * cell  # title band, two rows, captions under each


def test_fid_of_the_reference_set_with_itself_is_zero(coco):
    files = [str(p) for p in sorted((coco / "images").iterdir())]
    a = sweep.reference_stats(files, 32, tiny_features, chunk=4)
    b = sweep.reference_stats(files[::-1], 32, tiny_features, chunk=5)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-14)  # order and chunking: rounding
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-14)
    # 6 images give a rank-5 covariance of 8-d features: the 3 zero eigenvalues of Σ1Σ2 come
    # out of sqrtm as ±ε·λmax² and their square roots as up to √ε·λmax each, so the trace
    # term, taken twice, can be off by 2·3·√ε·λmax; any real difference is far above that.
    lam_max = np.linalg.eigvalsh(a[1]).max()
    bound = 2 * (8 - (len(files) - 1)) * np.sqrt(np.finfo(np.float64).eps) * lam_max
    assert abs(metrics.frechet_distance(*a, *b)) <= bound


def test_missing_weights_are_all_named_before_any_work(tmp_path, tiny_models, coco, capsys):
    ckpt = save_tiny_denoiser(tmp_path / "w")
    argv = _argv(tmp_path, tiny_models, str(tmp_path / "no_clip"), coco, ckpt)
    argv += [
        "--inception-weights",
        str(tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"),
    ]
    argv[argv.index("--vae") + 1] = str(tmp_path / "no_vae")
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "pt_inception-2015-12-05-6726825d.pth" in err and "github.com/mseitzer/pytorch-fid" in err
    )
    assert str(tmp_path / "weights") in err
    assert "CLIP model folder" in err and "no_clip" in err
    assert "VAE folder" in err and "no_vae" in err
    assert not (tmp_path / "out").exists()

    argv = _argv(
        tmp_path, tiny_models, "openai/clip-vit-large-patch14", coco, str(tmp_path / "nockpt")
    )
    assert evaluate.main([*argv, "--metrics", "clip"]) == 2
    err = capsys.readouterr().err
    assert "nockpt" in err and "openai/clip-vit-large-patch14" in err and "pt_inception" not in err
    bad_guidance = [*argv, "--metrics", "clip", "--guidance", "3,-1"]
    assert evaluate.main(bad_guidance) == 2
    assert "guidance" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow  # ~40-70 s: two 2048-d sqrtm (~11 s each here) and an Inception compile
@pytest.mark.timeout(600)
def test_fid_with_the_inception_network_end_to_end(tmp_path, tiny_models, tiny_clip, coco):
    """The real feature path: random weights for pytorch-fid's own network, in its legacy format."""
    from pytorch_fid_upstream import random_state_dict

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_state_dict(seed=1), weights, _use_new_zipfile_serialization=False)
    ckpt = save_tiny_denoiser(tmp_path / "w")
    argv = _argv(tmp_path, tiny_models, tiny_clip, coco, ckpt, "--save-images")
    argv += [
        "--metrics",
        "fid",
        "--guidance",
        "6",
        "--num-images",
        "4",
        "--inception-weights",
        str(weights),
    ]
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "clip_score" not in report["rows"][0] and report["inception_weights"] == str(weights)
    # Same batch shape as the run (--batch-size 4), so the same compiled program and features.
    extract = sweep.inception_extractor(str(weights), batch_size=4)
    gen = np.stack(
        [np.asarray(Image.open(tmp_path / "out" / "g6" / f"{i:05d}.png")) for i in range(4)]
    )
    refs = [str(coco / "images" / f"img_{i}.png") for i in (95, 96, 97, 98)]  # first 4 ids
    want = metrics.frechet_distance(
        *metrics.feature_stats(extract(gen)), *sweep.reference_stats(refs, 64, extract)
    )
    # Identical features and float64 statistics: only sqrtm's own rounding could differ.
    assert report["rows"][0]["fid"] == pytest.approx(want, rel=1e-9)
    assert len(list((tmp_path / "cache" / "fid_refs").iterdir())) == 1  # reference stats cached


def test_validation_loss_of_a_weights_folder_matches_the_trainers_definition(tmp_path, capsys):
    root = str(tmp_path / "ds")
    make_dataset(root, shards=1, per_shard=6, text_dim=24, val_shards=2)
    ckpt = save_tiny_denoiser(tmp_path / "w", seed=3)
    out = tmp_path / "out"
    argv = ["--checkpoint", ckpt, "--val-loss", root, "--val-samples", "10", "--val-bins", "4"]
    argv += ["--batch-size", "3", "--out", str(out)]  # chunks of 4 on 4 devices, 2 padded
    assert evaluate.main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"model: {ckpt}: no model card" in stdout
    assert f"{ckpt} has no model card file: the results are only in report.json" in stdout
    val = json.loads((out / "report.json").read_text())["validation_loss"]
    assert val["set"] == {"root": root, "split": "val", "samples": 10}
    assert val["bins"] == validation.bin_names(4)
    ds = data.open_dataset(root)
    vset = validation.load_split(ds, "val", 10)
    graphdef, params, buffers = nnx.split(weights.load(ckpt), nnx.Param, ...)
    want = _reference(graphdef, params, buffers, vset, 4)
    got = [val[f"val_loss_{b}"] for b in val["bins"]]
    np.testing.assert_allclose(got, want, rtol=2e-6)  # float32 rounding, batched vs one by one
    assert val["val_loss"] == pytest.approx(np.mean(got), rel=1e-12)
    # A folder with a model card gets the result appended to it.
    meta = training_meta()
    meta["config"]["model"] = json.loads((tmp_path / "w" / "config.json").read_text())
    model_card.write(ckpt, model_card.from_training_meta(meta))
    assert evaluate.main(argv) == 0
    assert f"added to the model card: {ckpt}/model_card.md" in capsys.readouterr().out
    [entry] = model_card.read(ckpt)["evaluations"]
    assert entry["kind"] == "validation_loss" and entry["results"] == val


def test_evaluate_needs_something_to_do_and_data_that_fits(tmp_path, capsys):
    ckpt = save_tiny_denoiser(tmp_path / "w")
    assert evaluate.main(["--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 2
    assert "nothing to evaluate: give --captions and --images" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", ckpt, "--captions", "c.json"]) == 2
    assert "FID/CLIP need both --captions and --images" in capsys.readouterr().err
    make_dataset(str(tmp_path / "wide"), shards=1, per_shard=2, text_dim=32)
    argv = ["--checkpoint", ckpt, "--val-loss", str(tmp_path / "wide"), "--out", str(tmp_path)]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "latents (4, 8, 8) and 32-d text do not fit the model ((4, 8, 8), 24-d)" in err
