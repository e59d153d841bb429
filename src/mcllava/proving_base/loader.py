"""Loading the proving-ground base: the committed weights (or an export of `mcllava base build`) plus SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from ..errors import McLlavaError
from ..smollm2 import load_smollm2

NAME = "proving-ground"  # what `Backbone.load` and `--base` take for the committed weights
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


def is_proving_ground(name: str) -> bool:
    """`proving-ground`, or a folder that `mcllava base build` exported (it holds the LoRA delta)."""
    return name == NAME or (Path(name) / "lm_delta.safetensors").is_file()


def load_by_name(name: str):
    """(model, processor) for a name that `is_proving_ground` accepts: the committed weights or that folder."""
    return load(None if name == NAME else name)
