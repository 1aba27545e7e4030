"""Tiny random VAE, CLIP, T5, BERT-sentence and LLaVA models saved to a temp dir (no hub).

``tiny_models`` (session fixture) returns a ``TinyModels`` whose attributes are local folder
paths that the production loaders open with ``from_pretrained(path)``. Each model is built on
first access and reused for the rest of the session, so a test pays only for the models it
reads. Tokenizers are word-level, built in memory from ``WORDS``; every tokenizer adds
``<bos>``/``<eos>``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

WORDS = (
    "a an the red green blue square circle photo of image picture small large dog cat tree "
    "sky house on in with and describe this highly detailed manner USER ASSISTANT : ."
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>"]


def make_tokenizer(bos: bool = True):
    """A word-level PreTrainedTokenizerFast over WORDS that appends <eos> (and <bos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    single = ("<bos> $A <eos>" if bos else "$A <eos>").split()
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single),
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<image>"],
        model_max_length=77,
    )


def _vae(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
    ).save_pretrained(path)


def _clip(path: Path) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    tok = make_tokenizer()
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=24,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModelWithProjection(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _t5(path: Path) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    tok = make_tokenizer(bos=False)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    T5EncoderModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _sentence(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    tok = make_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _llava(path: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(4)
    tok = make_tokenizer()
    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model may stop at once; never generating specials keeps test captions non-empty.
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(path)


def _lazy(build: Callable[[Path], None]) -> functools.cached_property:
    """A cached property that builds one model into ``root/<name>`` and returns its path."""

    def path(self: TinyModels) -> str:
        folder = self.root / build.__name__.lstrip("_")
        build(folder)
        return str(folder)

    return functools.cached_property(path)


class TinyModels:
    """Folder paths of the tiny models, each saved under ``root`` on first access."""

    def __init__(self, root: Path):
        self.root = root

    vae = _lazy(_vae)
    clip = _lazy(_clip)
    t5 = _lazy(_t5)
    sentence = _lazy(_sentence)
    llava = _lazy(_llava)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Tiny random models, each built once per session when a test first reads it."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))
