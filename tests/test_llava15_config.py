"""LLaVA-1.5-7B's published configuration, truncated in depth, goes through the whole code path.

Real weights cannot be had offline, so the model is built from `shared/reference/llava-1.5-configs.json`'s values
(CLIP ViT-L/14 at 336 px, 576 image tokens, 32064 text rows for a 32002-entry tokenizer, image token 32000,
pad 32001, untied head) with one layer per tower, saved with `save_pretrained`, and loaded by path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcllava.backbone import Backbone
from mcllava.concepts import ConceptSet
from mcllava.tiny import llama_like_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llava-1.5-configs.json"

# The published values (also in shared/reference when present); kept here so the test runs from any checkout.
LLAVA15_7B = {
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
}


@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    published = json.loads(REFERENCE.read_text())["llava-1.5-7b"] if REFERENCE.exists() else LLAVA15_7B
    text = {**published["text_config"], "num_hidden_layers": 1}
    vision = {**published["vision_config"], "num_hidden_layers": 2}  # feature layer -2 needs two
    text.pop("model_type"), vision.pop("model_type")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, tie_word_embeddings=False),
        image_token_index=published["image_token_index"],
        pad_token_id=published["pad_token_id"],
        projector_hidden_act=published["projector_hidden_act"],
        vision_feature_layer=published["vision_feature_layer"],
        vision_feature_select_strategy=published["vision_feature_select_strategy"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    tok = llama_like_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    out = tmp_path_factory.mktemp("llava15")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _concepts(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cid in ("bo", "ana"):
        (root / cid / "train").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / cid / "train" / f"{i}.png")
    return root


@pytest.mark.slow  # LLaVA-1.5-7B's full-width embeddings, trained and answered
def test_llava15_shape_loads_grows_trains_and_answers(llava15_dir, tmp_path):
    from mcllava.assistant import PersonalAssistant
    from mcllava.train import TrainConfig, personalize

    backbone = Backbone.load(llava15_dir, dtype=torch.bfloat16, device="cpu")
    assert backbone.num_image_tokens == 576 and backbone.grid == (24, 24)
    assert backbone.model.get_input_embeddings().weight.shape[0] == 32064
    assert not backbone.model.config.tie_word_embeddings and len(backbone.tokenizer) == 32002
    vt = backbone.visual_tokens([Image.new("RGB", (500, 400), "red")])
    assert vt.features.shape == (1, 576, 4096)

    concepts = ConceptSet.load(_concepts(tmp_path / "concepts"), tokenizer=backbone.tokenizer)
    config = TrainConfig(k=4, epochs=1, batch_size=2, holdout=0)
    result = personalize(concepts, backbone, tmp_path / "bank", config, progress=False, log=lambda *_: None)
    # 2 concepts x 5 tokens fit in the 62 spare rows: the matrix neither shrinks nor grows
    assert backbone.model.get_input_embeddings().weight.shape[0] == 32064
    assert len(backbone.tokenizer) == 32012
    assert result.history[0]["steps"] >= 1 and np.isfinite(result.history[0]["loss"])
    assert result.bank.head_rows is not None and result.bank.input_rows.shape == (2, 5, 4096)

    assistant = PersonalAssistant.load(
        tmp_path / "bank", Backbone.load(llava15_dir, dtype=torch.bfloat16, device="cpu")
    )
    # The fallback LLaVA-1.5 prompt format is used (this processor has no chat template).
    assert "USER: <image>\n" in assistant.backbone.format_prompt("Is <bo> here?", "sys")
    out = assistant.respond(Image.new("RGB", (336, 336), "blue"), "Is <bo> in this photo?", max_new_tokens=3)
    assert isinstance(out.text, str) and out.system.startswith("<ana> is <ana_1><ana_2><ana_3><ana_4>. <bo> is <bo_1>")


def test_other_llava_families_are_refused_clearly():
    from transformers import LlavaNextConfig

    from mcllava.backbone import UnsupportedModelError, _check_architecture

    cfg = LlavaNextConfig()
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        _check_architecture(cfg)
