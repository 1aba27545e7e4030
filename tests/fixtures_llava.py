"""A tiny random LLaVA whose processor has llava-hf/llava-1.5-7b-hf's real chat template and
image-token settings (written down from its hub files, nothing downloaded).

The facts, from llava-hf/llava-1.5-7b-hf:
- ``chat_template.json``: ``LLAVA_15_CHAT_TEMPLATE`` (a user turn renders as
  ``USER: <image>\\n{text} ``, the generation prompt as ``ASSISTANT:``).
- ``processor_config.json``: ``image_token`` "<image>", ``patch_size`` 14,
  ``num_additional_image_tokens`` 1, ``vision_feature_select_strategy`` "default". It has no
  ``image_seq_length``: LlavaProcessor derives the count, (336 // 14)² + 1 − 1 = 576 tokens
  per image, the CLS feature being dropped by the "default" strategy.
- ``preprocessor_config.json`` (CLIPImageProcessor): shortest edge 336, center crop 336×336,
  bicubic (resample 3), the CLIP mean/std below.
- ``config.json``: vision tower CLIP ViT-L/14-336 (image_size 336, patch_size 14),
  ``vision_feature_layer`` −2, ``vision_feature_select_strategy`` "default", projector
  activation gelu; ``<image>`` is token 32000 of its Llama tokenizer.
Only the sizes of the towers are tiny; the tokenizer is the word-level test tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from fixtures_models import SPECIALS, make_tokenizer

LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 14
CROP_SIZE = 336
NUM_ADDITIONAL_IMAGE_TOKENS = 1
VISION_FEATURE_SELECT_STRATEGY = "default"
VISION_FEATURE_LAYER = -2
NUM_IMAGE_TOKENS = 576  # (336 // 14) ** 2 + 1 - 1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_15_prompt(text: str) -> str:
    """The LLaVA-1.5 prompt of one image and a text, as its model card writes it."""
    return f"USER: {IMAGE_TOKEN}\n{text} ASSISTANT:"


def build_llava15(path: Path, chat_template: str | None = LLAVA_15_CHAT_TEMPLATE) -> str:
    """Save the tiny LLaVA-1.5 (random weights, real processor settings) under ``path``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(6)
    tok = make_tokenizer()
    vision = CLIPVisionConfig(image_size=CROP_SIZE, patch_size=PATCH_SIZE, hidden_size=16,
                              intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=16)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        vision_feature_layer=VISION_FEATURE_LAYER,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model may stop at once; never generating specials keeps test captions non-empty.
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CROP_SIZE},
        crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        num_additional_image_tokens=NUM_ADDITIONAL_IMAGE_TOKENS,
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    ).save_pretrained(path)
    return str(path)
