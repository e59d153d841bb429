"""Stage 4, export: the loadable weights folder that `proving_base.load()` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...errors import McLlavaError
from .common import _done, assemble, tokenizer_for
from .config import BuildConfig, _jsonable


def stage_export(cfg: BuildConfig, out: Path | None = None) -> dict:
    """Write the loadable weights folder: vision.safetensors, lm_delta.safetensors, config.json, processor/."""
    out = Path(out) if out is not None else cfg.work / "export"
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(cfg)
    model, processor = assemble(cfg, tok)
    final = cfg.work / "lm" / "trainable.safetensors"
    if final.exists():
        state, lm_steps = load_file(final), None
    else:  # an interrupted LM stage: export its last checkpoint (build.json says how far it got)
        ckpt = torch.load(cfg.work / "lm" / "ckpt.pt", weights_only=False)
        state, lm_steps = ckpt["trainable"], ckpt["step"]
    vision = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    vision.update({f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    vision.update(
        {
            k.replace("model.multi_modal_projector.", "multi_modal_projector."): v  # trained in the LM stage
            for k, v in state.items()
            if "multi_modal_projector" in k
        }
    )
    delta = {
        k.replace("model.language_model.", "").replace(".default.weight", ""): v
        for k, v in state.items()
        if "lora_" in k
    }
    meta = {"lora_rank": str(cfg.lm.lora_rank), "lora_alpha": str(cfg.lm.lora_alpha)}
    save_file({k: v.to(torch.float16).contiguous() for k, v in vision.items()}, out / "vision.safetensors")
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in delta.items()}, out / "lm_delta.safetensors", metadata=meta
    )
    cfg_dict = model.config.to_dict()
    cfg_dict["text_config"].pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    processor.save_pretrained(out / "processor")
    info = {
        "vision_stage": _done(cfg.work, "vision"),
        "align_stage": _done(cfg.work, "align"),
        "lm_stage": _done(cfg.work, "lm") or {"interrupted_at_step": lm_steps},
        "config": _jsonable(cfg),
    }
    (out / "build.json").write_text(json.dumps(info, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "bytes": size}


def work_from_weights(weights: str | Path, work: Path) -> None:
    """Seed a build folder with an export's vision tower and projector, so that an LM stage can continue it
    (with `LMStage.init_from` set to the same folder) without the vision and align stages."""
    vision = load_file(Path(weights) / "vision.safetensors")
    for part, prefix in (("tower", "vision_tower."), ("projector", "multi_modal_projector.")):
        state = {k[len(prefix) :]: v.float().contiguous() for k, v in vision.items() if k.startswith(prefix)}
        if not state:
            raise McLlavaError(f"{Path(weights) / 'vision.safetensors'} has no {prefix}* tensors")
        (work / "align").mkdir(parents=True, exist_ok=True)
        save_file(state, work / "align" / f"{part}.safetensors")
