"""`mcllava base ...`: build, check and inspect the proving-ground base (mounted by mcllava.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .build import (
    DEFAULT_WORK,
    LAYOUTS,
    SLOT_WORDS,
    AlignStage,
    BuildConfig,
    LMStage,
    VisionStage,
    build,
    slots_phases,
    v3_config,
    visual_phases,
    work_from_weights,
)
from .gate import CHECKS, GateConfig, gate
from .model import VisionSpec

base_app = typer.Typer(help="Build and check the small offline proving-ground base VLM.", no_args_is_help=True)


@base_app.command("build")
def build_cmd(
    work: Path = typer.Option(None, help="work folder for checkpoints (default ~/.cache/mcllava/proving-base-build)"),
    out: Optional[Path] = typer.Option(None, help="where to export the weights (default WORK/export)"),
    stages: str = typer.Option("vision,align,lm,export", help="comma-separated stages to run (each resumes)"),
    vision_steps: int = typer.Option(None, help="vision tower pretraining steps"),
    vision_scenes: int = typer.Option(None, help="scenes rendered for the vision and align stages"),
    align_steps: int = typer.Option(None, help="align steps of the projector alone"),
    align_tower_steps: int = typer.Option(None, help="align steps of tower and projector together (0: none)"),
    gpu_vision: bool = typer.Option(
        False,
        help="train the vision tower on the GPU with its larger recipe "
        "(VisionSpec.gpu(), VisionStage.gpu(): ~2 min on an H100)",
    ),
    preset: Optional[str] = typer.Option(
        None,
        help="v3: the version-3 base (12x12 patch grid, heads and align words for every trait, action, held "
        "object and setting; layout grid); --gpu-vision picks its GPU recipe",
    ),
    layout: str = typer.Option(
        "grid",
        help="what the image tokens show: grid (each patch its owner's words) or "
        "slots (each token row the character at one scene slot, one word per token)",
    ),
    phase_steps: Optional[str] = typer.Option(
        None,
        help="LM steps per phase, comma-separated (grid: read,describe,"
        "compare; slots: text,read,describe,ground,lookalike,tower)",
    ),
    mix: list[str] = typer.Option(
        [],
        help="a phase's sample mix, PHASE=6 weights: caption,vqa,text,defined,visual,"
        "visual_caption (e.g. describe=0.3,0.7,0,0,0,0); repeatable",
    ),
    continue_from: Optional[Path] = typer.Option(
        None,
        help="continue a slots build from this weights folder "
        "(e.g. the committed one): its tower, projector and LoRA start the "
        "LM stage, which runs the `visual` phase (visual definitions)",
    ),
    visual_steps: int = typer.Option(300, help="with --continue-from: steps of the visual phase"),
    both: float = typer.Option(
        0.0,
        help="with --continue-from: share of the visual phase's recognition samples "
        "that ask whether two defined names are both in the photo",
    ),
    lr: Optional[float] = typer.Option(None, help="the LM stage's LoRA learning rate (default 1e-3)"),
    device: str = typer.Option("cpu", help="where the LM stage's steps run: cpu or cuda"),
    workers: int = typer.Option(1, help="processes that draw the LM stage's samples"),
    time_budget: Optional[float] = typer.Option(None, help="seconds after which the LM stage ends early"),
    seed: int = typer.Option(0),
) -> None:
    """Build (or resume building) the proving-ground base: vision -> align -> lm -> export."""
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout is grid or slots, not {layout!r}")
    if preset not in (None, "v3"):
        raise typer.BadParameter(f"--preset is v3, not {preset!r}")
    if preset is not None and (layout != "grid" or continue_from is not None):
        raise typer.BadParameter("--preset v3 is a grid build from nothing: drop --layout slots / --continue-from")
    if continue_from is not None:
        layout = json.loads((continue_from / "config.json").read_text()).get("mcllava_token_layout", "grid")
        if layout != "slots":
            raise typer.BadParameter(f"--continue-from needs a slots build; {continue_from} is {layout!r}")
        # the vision and align stages come from the weights
        stages = ",".join(s for s in stages.split(",") if s.strip() not in ("vision", "align"))
    cfg = BuildConfig(work=Path(work or DEFAULT_WORK).expanduser(), seed=seed, layout=layout)
    if preset == "v3":
        cfg = v3_config(gpu_vision, work=cfg.work, seed=seed)
    if layout == "slots":
        cfg.align, cfg.lm = AlignStage(words=SLOT_WORDS, steps=1000), LMStage(phases=slots_phases())
    if continue_from is not None:
        work_from_weights(continue_from, cfg.work)
        # k = 6 rows per visual definition: one slot row, the k that personalisation uses on this base
        cfg.lm = LMStage(
            phases=visual_phases(visual_steps, both), definition_rows=6, init_from=str(continue_from), pool=24000
        )
    cfg.lm.device, cfg.lm.workers, cfg.lm.time_budget = device, workers, time_budget
    if lr is not None:
        cfg.lm.lr_lora = lr
    if gpu_vision and preset is None:
        cfg.vision, cfg.vision_stage = VisionSpec.gpu(), VisionStage.gpu()
    if vision_steps is not None:
        cfg.vision_stage.steps = vision_steps
    if vision_scenes is not None:
        cfg.vision_stage.scenes = vision_scenes
    if align_steps is not None:
        cfg.align.steps = align_steps
    if align_tower_steps is not None:
        cfg.align.tower_steps = align_tower_steps
    phases = {p.name: p for p in cfg.lm.phases}
    if phase_steps is not None:
        steps = [int(s) for s in phase_steps.split(",")]
        if len(steps) != len(phases) or min(steps) < 0:
            raise typer.BadParameter(
                f"--phase-steps takes {len(phases)} non-negative counts ({','.join(phases)}), not {phase_steps!r}"
            )
        for p, n in zip(cfg.lm.phases, steps):
            p.steps = n
    for m in mix:
        name, _, ws = m.partition("=")
        weights = tuple(float(w) for w in ws.split(",")) if ws else ()
        if name not in phases or len(weights) != 6 or min(weights) < 0 or sum(weights) <= 0:
            raise typer.BadParameter(
                f"--mix is PHASE=6 non-negative weights with PHASE one of {','.join(phases)}, not {m!r}"
            )
        phases[name].curriculum.mix = weights
    res = build(cfg, tuple(s.strip() for s in stages.split(",") if s.strip()), out)
    typer.echo(json.dumps(res, indent=1, default=str))


@base_app.command("gate")
def gate_cmd(
    weights: Optional[Path] = typer.Option(None, help="weights folder (default: the committed one)"),
    out: Path = typer.Option(Path("proving-base-gate.json"), help="JSON report"),
    seed: int = typer.Option(9001, help="world seed of the gate (never used in training)"),
    captions: int = typer.Option(40, help="caption samples"),
    generic: int = typer.Option(120, help="colour / category / position / exists questions"),
    definitions: int = typer.Option(200, help="recognition samples with in-context definitions"),
    named: int = typer.Option(100, help="named recognition samples without definitions"),
    visual: int = typer.Option(100, help="recognition samples with visual definitions (reported)"),
    both: int = typer.Option(100, help='"are <x> and <y> both here?" samples with visual definitions (reported)'),
    choice: int = typer.Option(60, help="multiple-choice questions answered with a letter (reported)"),
    open_answers: int = typer.Option(60, "--open", help="short open answers about a defined character (reported)"),
    where: int = typer.Option(40, help='"Where is <x>?" questions (reported)'),
    named_caption: int = typer.Option(30, help="captions naming the defined characters (reported)"),
    facts: int = typer.Option(60, help="text-only questions about introduced facts (reported)"),
    checks: str = typer.Option(",".join(CHECKS), help="comma-separated checks to run (a subset passes nothing)"),
) -> None:
    """Measure the quality gate (captions, generic questions, definition recognition, named recognition) and the
    evaluation's tasks (choice, open answers, where, named captions, facts)."""
    wanted = tuple(c.strip() for c in checks.split(",") if c.strip())
    if not set(wanted) <= set(CHECKS):
        raise typer.BadParameter(f"--checks takes some of {','.join(CHECKS)}, not {checks!r}")
    counts = dict(choice=choice, open=open_answers, where=where, named_caption=named_caption, facts=facts)
    res = gate(
        weights,
        out,
        GateConfig(
            seed=seed,
            captions=captions,
            generic=generic,
            definitions=definitions,
            named=named,
            visual=visual,
            both=both,
            checks=wanted,
            **counts,
        ),
    )
    typer.echo(json.dumps(res["summary"], indent=1))
    typer.echo(f"passed: {res['passed']}  (report: {out})")
    raise typer.Exit(1 if res["passed"] is False else 0)
