"""`mcllava base build`: the proving-ground base, in resumable stages.

1. vision  - a CLIP ViT trained from scratch on world scenes with multi-label heads (per slot of the scene:
             category, colour, pattern, ears, head, eyes, build, accessory and its colour).
2. align   - LLaVA's MLP projector fitted (with the language model untouched) so that each patch's visual token
             is one word's embedding (its owner's category or colour word, alternating over the grid; background:
             "grass" at half norm): the language model meets image tokens that already read like words. Then
             tower and projector are tuned together from pixels, so that each patch shows the word of its
             position instead of a blend. The projector then stays frozen. With `layout="slots"` the tokens are
             not patches: row r spells out the character at scene slot r, one word per token (`SLOT_WORDS`).
3. lm      - LoRA on every attention and MLP matrix of SmolLM2, answer-only loss, in curriculum phases
             (`LMStage.phases`): read ("Is there a ...?"), describe (captions, colour / category / position
             questions), compare (one or two definitions, look-alike negatives; reading kept up).
4. export  - vision tower + projector + the LoRA factors (the language-model delta) as fp16 safetensors, and
             the processor, into a folder that `proving_base.load()` reads.

`v3_config()` (`mcllava base build --preset v3`) builds the version-3 base: a 12x12 patch grid whose heads read
every trait, the action and held object of each character and the scene's setting, with each owned patch aligned
to two of its owner's eleven words and the background to the setting word.

Each stage checkpoints into `work/<stage>/` and is skipped once its `done.json` exists; an interrupted stage
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from .align import BACKGROUND_NORM, stage_align
from .common import assemble, tokenizer_for
from .config import (
    DEFAULT_WORK,
    LAYOUTS,
    SLOT_WORDS,
    V3_WORDS,
    AlignStage,
    BuildConfig,
    LMStage,
    Phase,
    VisionStage,
    _jsonable,
    check_layout,
    default_phases,
    slots_phases,
    v3_config,
    v3_lm_phases,
    v3_phases,
    visual_phases,
)
from .export import stage_export, work_from_weights
from .lm import stage_lm
from .pool import EncodedPool
from .scoring import yes_no_report, yes_no_scores
from .vision import stage_vision

__all__ = [
    "BACKGROUND_NORM",
    "DEFAULT_WORK",
    "LAYOUTS",
    "SLOT_WORDS",
    "V3_WORDS",
    "AlignStage",
    "BuildConfig",
    "EncodedPool",
    "LMStage",
    "Phase",
    "VisionStage",
    "assemble",
    "build",
    "check_layout",
    "default_phases",
    "slots_phases",
    "stage_align",
    "stage_export",
    "stage_lm",
    "stage_vision",
    "tokenizer_for",
    "v3_config",
    "v3_lm_phases",
    "v3_phases",
    "visual_phases",
    "work_from_weights",
    "yes_no_report",
    "yes_no_scores",
]


def build(
    cfg: BuildConfig, stages: tuple[str, ...] = ("vision", "align", "lm", "export"), out: Path | None = None
) -> dict:
    """Run (or resume) the stages in order; returns each stage's summary."""
    check_layout(cfg)
    cfg.work.mkdir(parents=True, exist_ok=True)
    (cfg.work / "config.json").write_text(json.dumps(_jsonable(cfg), indent=1))
    res = {}
    for name in stages:
        fn = {"vision": stage_vision, "align": stage_align, "lm": stage_lm}.get(name)
        res[name] = fn(cfg) if fn else stage_export(cfg, out)
    return res
