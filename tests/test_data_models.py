"""Model folders: a folder whose weights do not fit the class a flag asks for is an error."""

import json

import numpy as np
import pytest
import torch
from fixtures_images import write_image_folder
from fixtures_models import make_tokenizer
from safetensors.torch import load_file, save_file

from data_prep.model_refs import ModelError
from data_prep.settings import parse_spec
from data_prep.text_encoders import TextEncoder

TEXTS = ["a red dog on a house", "the sky"]


@pytest.fixture(scope="module")
def full_models(tmp_path_factory):
    """A whole tiny CLIPModel and T5ForConditionalGeneration, laid out as the hub's defaults
    (openai/clip-vit-large-patch14, google/t5-v1_1-xxl) are: text tower plus the rest."""
    from transformers import CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("full_models")
    tok = make_tokenizer()
    torch.manual_seed(5)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                projection_dim=24)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    t5_tok = make_tokenizer(bos=False)
    cfg = T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_heads=4, pad_token_id=t5_tok.pad_token_id,
                   eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0)  # fmt: skip
    T5ForConditionalGeneration(cfg).save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    return root


def test_whole_clip_and_t5_checkpoints_load_their_text_towers(full_models):
    from transformers import AutoTokenizer, CLIPModel, T5ForConditionalGeneration

    clip = TextEncoder(parse_spec(f"clip={full_models / 'clip'}"), "cpu", torch.float32)
    ref = CLIPModel.from_pretrained(full_models / "clip").eval()
    ids = AutoTokenizer.from_pretrained(full_models / "clip")(TEXTS, padding=True,
                                                               return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        want = ref.get_text_features(**ids)
    want = getattr(want, "pooler_output", want)  # transformers 5 may return a model output
    np.testing.assert_allclose(clip.encode(TEXTS)["clip_pooled"], want.numpy(), atol=2e-3)

    t5 = TextEncoder(parse_spec(f"t5={full_models / 't5'}"), "cpu", torch.float32, max_length=8)
    ref = T5ForConditionalGeneration.from_pretrained(full_models / "t5").eval()
    ids = AutoTokenizer.from_pretrained(full_models / "t5")(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        want = ref.encoder(**ids).last_hidden_state[0].numpy()
    got = t5.encode(TEXTS[:1])["t5_tokens"][0, : len(want)]
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3)


@pytest.mark.parametrize(
    ("spec", "folder", "want"),
    [
        ("clip", "sentence", r"holds a 'bert' model: 37 of 37 CLIPTextModelWithProjection"),
        ("t5", "sentence", r"t5=.*cannot load T5EncoderModel"),
        ("clip", "t5", r"holds a 't5' model: \d+ of \d+ CLIPTextModelWithProjection"),
        ("t5", "clip", r"holds a 'clip_text_model' model: \d+ of \d+ T5EncoderModel"),
        ("sentence", "vae", r"sentence=.*cannot load AutoModel"),
    ],
)
def test_text_encoder_of_another_class_is_an_error(tiny_models, spec, folder, want):
    with pytest.raises(ModelError, match=want) as e:
        TextEncoder(parse_spec(f"{spec}={getattr(tiny_models, folder)}"), "cpu", torch.float32)
    assert "--text-encoder" in str(e.value) and "kind" in str(e.value)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_vae_folder_of_another_kind_is_an_error(tiny_models, tmp_path):
    from data_prep.autoencoders import load_autoencoder

    def load(path):
        return load_autoencoder(str(path), 32, "cpu", torch.float32)

    vq = _copy(tiny_models.vae, tmp_path / "vq")
    cfg = json.loads((vq / "config.json").read_text())
    (vq / "config.json").write_text(json.dumps({**cfg, "_class_name": "VQModel"}))
    with pytest.raises(ModelError, match=r"--vae .*vq: its config.json describes a VQModel"):
        load(vq)
    with pytest.raises(ModelError, match=r"--vae .*clip: .*not a diffusers model"):
        load(tiny_models.clip)
    cut = _copy(tiny_models.vae, tmp_path / "cut")
    weights = load_file(cut / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in weights.items() if "quant_conv" not in k},
              cut / "diffusion_pytorch_model.safetensors")  # fmt: skip
    with pytest.raises(ModelError, match=r"4 of \d+ AutoencoderKL weights are missing"):
        load(cut)
    assert load(tiny_models.vae).channels == 4


def test_cli_refuses_a_text_encoder_of_another_class(tiny_models, tmp_path, capsys):
    from data_prep.encode import main

    write_image_folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), str(out), "--vae", "pixel", "--resolution", "32",
            "--text-encoder", f"clip={tiny_models.sentence}", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "holds a 'bert' model" in capsys.readouterr().err
    assert not (out / "shards").exists()
