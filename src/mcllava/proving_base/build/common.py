"""What the stages share: the build folder's bookkeeping, image normalisation, and the model of a build."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from ...layout import LAYOUT_KEY
from ..model import VisionSpec, build_llava, load_smollm2, proving_tokenizer
from .config import BuildConfig


def _log(work: Path, stage: str, record: dict) -> None:
    with open(work / stage / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _done(work: Path, stage: str) -> dict | None:
    p = work / stage / "done.json"
    return json.loads(p.read_text()) if p.exists() else None


def _finish(work: Path, stage: str, info: dict) -> dict:
    (work / stage / "done.json").write_text(json.dumps(info, indent=1))
    return info


def _save_ckpt(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _autocast(cfg: BuildConfig, device: str = "cpu"):
    """bf16 autocast: on the CPU as `cfg.autocast` says, always on CUDA."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=cfg.autocast or kind == "cuda")


def normalise(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> CLIP-normalised [B, 3, H, W] float (what CLIPImageProcessor produces)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=pixels_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=pixels_uint8.device).view(1, 3, 1, 1)
    return (pixels_uint8.permute(0, 3, 1, 2).float() / 255 - mean) / std


def vision_model(spec: VisionSpec):
    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=spec.hidden,
            intermediate_size=spec.hidden * 4,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.hidden,
        )
    )


def patch_tokens(tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens LLaVA takes from the tower: last layer, CLS dropped (vision_feature_layer=-1, "default")."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def tokenizer_for(cfg: BuildConfig):
    return proving_tokenizer(cfg.work / "tokenizer")


def assemble(cfg: BuildConfig, tokenizer=None):
    """The LLaVA model of this build with its trained vision tower (and projector, once aligned)."""
    tokenizer = tokenizer or tokenizer_for(cfg)
    text = cfg.text_model(tokenizer) if cfg.text_model is not None else load_smollm2()
    model, processor = build_llava(text, tokenizer, cfg.vision, seed=cfg.seed)
    if cfg.layout != "grid":  # Backbone (and every export) reads the token layout from the config
        setattr(model.config, LAYOUT_KEY, cfg.layout)
    tuned = cfg.work / "align" / "tower.safetensors"  # the align stage's tower, when it tuned it
    model.model.vision_tower.load_state_dict(
        load_file(tuned if tuned.exists() else cfg.work / "vision" / "tower.safetensors")
    )
    proj = cfg.work / "align" / "projector.safetensors"
    if proj.exists():
        model.model.multi_modal_projector.load_state_dict(load_file(proj))
    return model, processor


@torch.no_grad()
def tower_features(model, pixels_uint8: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Frozen vision-tower patch tokens of uint8 images ([B, N, hidden]); the projector runs later, with grads."""
    tower = model.model.vision_tower
    dev = next(tower.parameters()).device  # on the tower's device; the features come back to the CPU
    return torch.cat(
        [
            patch_tokens(tower, normalise(pixels_uint8[i : i + batch].to(dev))).float().cpu()
            for i in range(0, len(pixels_uint8), batch)
        ]
    )


def _start(cfg: BuildConfig, stage: str):
    """Seed, make the stage folder, and assemble the model: (tokenizer, model, processor)."""
    (cfg.work / stage).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tok = tokenizer_for(cfg)
    return (tok, *assemble(cfg, tok))
