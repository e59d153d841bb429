"""The proving-ground architecture: a small CLIP ViT + LLaVA's MLP projector + SmolLM2-135M-Instruct.

`build_llava` assembles a real `LlavaForConditionalGeneration` (the llava-1.5 code path) around any Llama-style
text model: the SmolLM2 GGUF for the real base, or a 2-layer model from a config for tests. The processor's
chat template puts the user's text BEFORE the `<image>` placeholder (`smollm2.chat_template(image_last=True)`),
which makes "compare a description with the image" much easier for a 135M language model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..smollm2 import chat_template, load_smollm2, smollm2_tokenizer

__all__ = ["VisionSpec", "build_llava", "load_smollm2", "proving_tokenizer", "tiny_text_model"]


@dataclass
class VisionSpec:
    """The vision tower: 192 px world images cut into 6x6 patches of 32 px -> 36 image tokens."""

    image_size: int = 192
    patch_size: int = 32
    hidden: int = 192
    layers: int = 4
    heads: int = 4

    @classmethod
    def gpu(cls) -> VisionSpec:
        """The wider, deeper tower that `VisionStage.gpu()` trains (5.5 M parameters against 1.8 M); same tokens."""
        return cls(hidden=256, layers=6, heads=4)

    @classmethod
    def v3(cls, gpu: bool = False) -> VisionSpec:
        """The version-3 tower: the same 192 px images cut into 12x12 patches of 16 px -> 144 image tokens.

        192 px is what the world renders and 16 px divides it (`patch_coverage` cuts masks by size // grid), so
        every scene, mask and test photo is used as drawn. At 12x12 a character owns a median of eight patches,
        enough for its eleven words two to a token (`AlignStage.v3`) to show 9.5 of them and the changed trait of
        0.89 of look-alikes; at 8x8 (four patches) one word a token shows 3.8 and 0.46, and 16x16 costs the
        language model 256 tokens a photo for about the same (docs/proving_base.md, "What the image tokens can
        show"). 144 tokens are a quarter of LLaVA-1.5's 576. Width 192 and 4 layers keep a CPU step affordable;
        with `gpu` the wider, deeper recipe of `gpu()` (5.5 M parameters), cheap on a GPU.
        """
        return replace(cls.gpu() if gpu else cls(), patch_size=16)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_llava(text_model, tokenizer, vision: VisionSpec = VisionSpec(), seed: int = 0):
    """A `LlavaForConditionalGeneration` with a fresh vision tower and projector around `text_model`.

    The text model's embeddings grow (to a multiple of 64 rows) to hold the `<image>` token; SmolLM2's head
    stays tied to them. Returns (model, processor).
    """

    torch.manual_seed(seed)
    tied = bool(getattr(text_model.config, "tie_word_embeddings", False))
    rows = max((len(tokenizer) + 63) // 64 * 64, text_model.get_input_embeddings().weight.shape[0])
    text_model.resize_token_embeddings(rows, mean_resizing=False)
    vcfg = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.hidden * 4,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=vision.hidden,
    )
    tcfg = text_model.config
    tcfg.vocab_size = rows
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    missing = model.model.language_model.load_state_dict(text_model.model.state_dict(), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    if tied:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    # looked up here, not imported: without torchvision, transformers warns at import time that it falls back
    # to the PIL processor, which would print on every `mcllava` command before the CLI quiets the libraries
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template(image_last=True),
        num_additional_image_tokens=1,
    )
    tokenizer.chat_template = chat_template(image_last=True)
    return model, processor


def tiny_text_model(tokenizer, hidden: int = 64, layers: int = 2, tied: bool = True):
    """A 2-layer Llama from a config (tests use it in place of SmolLM2)."""

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def proving_tokenizer(cache_dir: str | Path | None = None):
    """SmolLM2's tokenizer with this base's chat template (the image placeholder after the turn's text)."""
    return smollm2_tokenizer(cache_dir, image_last=True)
