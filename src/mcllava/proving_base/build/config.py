"""What decides a build: the configuration of each stage, the LM stage's curriculum phases, and `BuildConfig`.

docs/proving_base.md gives the measurements behind each default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import McLlavaError
from ..data import LABEL_TRAITS, N_SLOTS, PATCH_TRAITS, Curriculum
from ..model import VisionSpec

DEFAULT_WORK = Path("~/.cache/mcllava/proving-base-build").expanduser()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class VisionStage:
    """Stage 1: the CLIP tower trained from scratch on rendered scenes (docs/proving_base.md, "How it is built")."""

    scenes: int = 40000  # fewer scenes are memorised rather than learned
    steps: int = 5000  # every trait keeps improving up to here
    batch_size: int = 64
    lr: float = 2e-3
    device: str = "cpu"  # "cuda": the tower trains there, in bf16 autocast (align stays on the CPU; see LMStage.device)
    traits: tuple[str, ...] = PATCH_TRAITS  # what the heads read from a character's patches (`data.LABEL_TRAITS`)
    setting: bool = False  # a head reads the scene's setting from the mean of the background patches

    @classmethod
    def gpu(cls) -> VisionStage:
        """The recipe of the committed tower, about 2 minutes of one H100 after rendering (with `VisionSpec.gpu()`):
        every trait of held-out characters reads better than with the CPU default (docs/proving_base.md)."""
        return cls(scenes=48000, steps=3000, batch_size=256, device="cuda")

    @classmethod
    def v3(cls, gpu: bool = False) -> VisionStage:
        """The version-3 tower's heads: every trait the world varies, the character's action and held object,
        and the scene's setting; the schedule of `gpu()` on a GPU, the CPU default otherwise."""
        base = cls.gpu() if gpu else cls()
        base.traits, base.setting = LABEL_TRAITS, True
        return base


# The "slots" layout: image-token row r shows the character at scene slot r (`data._slot`: left / centre / right
# x near / far), one trait word per token in this order; an empty slot's row is the background word. A character
# then reads as six adjacent words ("cat red striped slim hat round"), which a 135M language model compares as
# quickly as text (docs/proving_base.md, "Token layout"). The traits left out change the fewest pixels.
SLOT_WORDS = ("category", "color", "pattern", "build", "accessory", "eyes")
# The version-3 tokens: the eleven words of `LABEL_TRAITS` superposed two to a token (the held object alone), so
# that six patches spell a whole character (benchmarks/token_capacity.py).
V3_WORDS = ("category+color", "pattern+ears", "head+eyes", "build+accessory", "accessory_color+action", "held")
LAYOUTS = ("grid", "slots")


@dataclass
class AlignStage:
    """Stage 2: image tokens made to read as words (docs/proving_base.md, "How it is built")."""

    steps: int = 2000  # the projector alone on cached tower features; fewer steps leave it underfitted
    batch_size: int = 128
    lr: float = 2e-3
    # the word(s) each owned patch is aligned to, cycled over the grid by (row + col) % len(words), or superposed
    # ("category+color"): exact cycled words are read far sooner than superposed ones
    words: tuple[str, ...] = ("category", "color")
    # every background patch: this word at BACKGROUND_NORM of a word's norm; "setting": the scene's setting word
    background_word: str = "grass"
    # then tower and projector together from pixels (0: the tower stays as the vision stage left it): a projector
    # on the frozen tower blends the words cycled over the grid, a tuned tower shows each position's own word
    tower_steps: int = 1500
    tower_lr: float = 1e-3
    tower_batch_size: int = 64
    heads_weight: float = 0.1  # the vision stage's trait-head loss, kept on while the tower is tuned
    # patch (r, c) shows word (stride * r + c) % len(words): with stride 2 the two patches of a row and the rows
    # below step through consecutive words, so a character two patches wide and four tall shows eight of them
    stride: int = 1

    @classmethod
    def v3(cls) -> AlignStage:
        """Every trait the vision heads read, two words to a token (`V3_WORDS`) cycled over the grid with stride 2,
        background patches as the setting word: the eight patches a character owns at 12x12 spell its traits,
        action and held object."""
        return cls(words=V3_WORDS, background_word="setting", stride=2)


@dataclass
class Phase:
    """One stretch of the LM stage: its name, its steps and what its samples look like."""

    name: str
    steps: int
    curriculum: Curriculum
    # "slots" layout only: the image rows are the exact align targets (word embeddings of who stands where)
    # instead of the tower's projected tokens: the language model learns to read and compare on clean tokens
    # (no tower needed yet), then later phases move it to the tower's own tokens
    oracle: bool = False


def default_phases() -> tuple[Phase, ...]:
    """The "grid" layout's curriculum: read first, then describe, then compare (docs/proving_base.md).

    read: "Is there a <category>?" only (mixed with other kinds from the start, the image tokens are read far
    later); describe: captions and all question kinds, reading kept up; compare: one or two definitions,
    look-alikes, reading kept up.
    """
    return (
        Phase("read", 100, Curriculum(1, 0.0, (0, 1, 0, 0, 0, 0), (1, 0, 0, 0))),
        Phase("describe", 150, Curriculum(1, 0.0, (0.3, 0.7, 0, 0, 0, 0), (0.4, 0.2, 0.2, 0.2))),
        Phase("compare", 650, Curriculum(2, 0.6, (0.08, 0.15, 0.1, 0.27, 0.3, 0.1))),
    )


def visual_phases(steps: int = 300, both: float = 0.0) -> tuple[Phase, ...]:
    """Continue a slots build on recognition and captions with *visual* definitions ("<x> is" + the k rows of
    another photo of x: the form personal concepts take), word definitions with look-alikes, captions and
    generic questions kept up, all on the tower's tokens: `slots_phases()` never trains the visual kinds, which
    the committed weights learned this way (docs/proving_base.md). `both`: the share of its recognition samples
    that ask about two names at once (`Curriculum.both`)."""
    mix = (0.1, 0.15, 0.05, 0.2, 0.35, 0.15)  # caption, vqa, text, defined, visual_defined, visual_caption
    return (Phase("visual", steps, Curriculum(2, 0.5, mix, (0.5, 1, 1.5, 1.5), both=both)),)


def v3_phases(steps: int = 700, both: float = 0.1) -> tuple[Phase, ...]:
    """Teach every task of the MC-LLaVA evaluation (`tasks.py`: lettered choice, open answers, "Where is <x>?",
    captions naming the defined characters, text-only facts) to a base that already reads its image tokens and
    recognises defined names: append it to the phases that taught those, or continue an export with it.

    Two phases on the tower's tokens. "tasks" (30% of the steps): the new answer formats weigh 0.65 of the mix,
    since a format the model has never produced costs the most loss at first. "tasks_mix" (the rest, where the
    lr's cosine decay falls): back to about half recognition (word and visual definitions, look-alikes half of the
    negatives, `both` of them asking about two names, as the evaluation's multi-concept questions do) and generic
    questions, so that the Yes/No calibration, which the evaluation's recognition figures need most, settles
    last. Its samples are longer (110 tokens on average against 85), so 700 steps of batch 16 hold as many tokens
    as `visual_phases(900)`, which took 300 s of one H100 (docs/proving_base.md: its padded batches are wider,
    which a CPU step pays for in full)."""
    generic = (0.5, 1, 1.5, 1.5)  # exists, colour, category, position
    first = int(round(steps * 0.3))
    formats = Curriculum(
        2,
        0.5,
        (0.02, 0.05, 0.02, 0.08, 0.15, 0.03),  # caption, vqa, text, defined, visual_defined, visual_caption
        generic,
        both=both,
        tasks={"choice": 0.18, "open": 0.18, "where": 0.1, "named_caption": 0.11, "facts": 0.08},
    )
    mixed = Curriculum(
        2,
        0.5,
        (0.03, 0.07, 0.03, 0.12, 0.25, 0.02),
        generic,
        both=both,
        tasks={"choice": 0.13, "open": 0.13, "where": 0.08, "named_caption": 0.08, "facts": 0.06},
    )
    return (Phase("tasks", first, formats), Phase("tasks_mix", steps - first, mixed))


def slots_phases() -> tuple[Phase, ...]:
    """The "slots" layout's curriculum: compare in text first, then read, describe, ground one definition against
    easy negatives and compare 1-2 definitions against look-alikes, all on the exact slot words (oracle), then the
    same comparisons on the tower's own tokens; a second look-alike stretch on the slot words, and two on the
    tower's tokens with category and position questions weighed up (docs/proving_base.md, "How it is built")."""
    look = Curriculum(2, 0.5, (0.1, 0.15, 0.1, 0.65, 0, 0))
    generic = (0.5, 1, 1.5, 1.5)  # exists, colour, category, position
    return (
        Phase("text", 100, Curriculum(1, 0.5, (0, 0, 1, 0, 0, 0))),
        Phase("read", 50, Curriculum(1, 0.0, (0, 1, 0, 0, 0, 0), (1, 0, 0, 0)), oracle=True),
        Phase("describe", 100, Curriculum(1, 0.0, (0.3, 0.7, 0, 0, 0, 0), (0.25, 0.25, 0.25, 0.25)), oracle=True),
        Phase("ground", 150, Curriculum(1, 0.0, (0.1, 0.15, 0.15, 0.6, 0, 0)), oracle=True),
        Phase("lookalike", 150, look, oracle=True),
        Phase("tower", 100, look),
        Phase("lookalike2", 200, look, oracle=True),
        Phase("tower2", 150, Curriculum(2, 0.5, (0.1, 0.25, 0.05, 0.6, 0, 0), generic)),
        Phase("tower3", 150, Curriculum(2, 0.5, (0.05, 0.2, 0.05, 0.7, 0, 0), generic)),
    )


@dataclass
class LMStage:
    """Stage 3: LoRA on SmolLM2 in curriculum phases, with a held-out Yes/No curve (docs/proving_base.md)."""

    phases: tuple[Phase, ...] = field(default_factory=default_phases)
    pool: int = 2400  # pre-encoded samples per phase at most (a phase of s steps needs at most s x batch_size)
    val_pool: int = 240  # held-out recognition samples (word, text and visual definitions), scored every eval_every
    val_read: int = 200  # held-out "Is there a ...?" questions (is the image read?), scored with the val pool
    definition_rows: int = 4  # rows per visual definition slot (the demo's k)
    batch_size: int = 16
    lora_rank: int = 32
    lora_alpha: int = 32
    lr_lora: float = 1e-3
    lr_projector: float = 0.0  # 0: the aligned projector stays frozen (trained with the LoRA it drifted unreadable)
    warmup: int = 10
    # the lr stays flat after warm-up and decays (cosine) over this last share of all steps: a cosine over the
    # whole run decays too early, while the image tokens are still being learned to be read
    decay: float = 0.3
    eval_every: int = 50
    checkpoint_every: int = 25
    # "cuda": the steps and held-out scoring run there in bf16 autocast; pools are still drawn and kept on the CPU
    device: str = "cpu"
    workers: int = 1  # processes that draw (render) pool samples; each sample is fixed by its index, so any count
    # continue a build: a weights folder (an export, e.g. the committed one) whose LoRA delta starts the LoRA
    init_from: str | None = None
    time_budget: float | None = None  # seconds: end the stage early (at a checkpoint) once this much has passed

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> int:
        """Index of the phase that step `step` (0-based) belongs to."""
        end = 0
        for i, p in enumerate(self.phases):
            end += p.steps
            if step < end:
                return i
        return len(self.phases) - 1

    def lr_factor(self, step: int) -> float:
        total = self.steps
        start = total * (1 - self.decay)
        cos = 1.0 if step < start else 0.5 * (1 + math.cos(math.pi * (step - start) / max(1.0, total - start)))
        return min(1.0, (step + 1) / self.warmup) * cos


@dataclass
class BuildConfig:
    """Everything that decides a build (written to work/config.json and the model card's figures)."""

    work: Path = DEFAULT_WORK
    seed: int = 0
    vision: VisionSpec = field(default_factory=VisionSpec)
    vision_stage: VisionStage = field(default_factory=VisionStage)
    align: AlignStage = field(default_factory=AlignStage)
    lm: LMStage = field(default_factory=LMStage)
    # what the image tokens show: "grid" (each patch its owner's trait word, `AlignStage.words` cycled over the
    # grid) or "slots" (token row r the character at scene slot r, one word of `AlignStage.words` per column)
    layout: str = "grid"
    autocast: bool = True  # bf16 autocast on CPU: several times faster steps through SmolLM2
    progress: bool = True
    text_model: Callable | None = None  # tests: a factory (tokenizer -> small Llama) instead of SmolLM2


def v3_lm_phases() -> tuple[Phase, ...]:
    """The LM curriculum of the version-3 preset: read, describe and compare with word definitions
    (`default_phases`), then recognition and captions with visual definitions (`visual_phases`), then every task
    of the evaluation (`v3_phases`)."""
    return (*default_phases(), *visual_phases(300, both=0.1), *v3_phases())


def v3_config(gpu: bool = False, **kw) -> BuildConfig:
    """The version-3 build: a 12x12 patch grid (`VisionSpec.v3`), heads for every trait, action, held object and
    setting (`VisionStage.v3`), every trait's word, two to a token, cycled over a character's patches and the
    setting word on the background (`AlignStage.v3`), `layout="grid"`. `gpu`: the vision stage's larger recipe,
    on CUDA."""
    return BuildConfig(
        vision=VisionSpec.v3(gpu),
        vision_stage=VisionStage.v3(gpu),
        align=AlignStage.v3(),
        lm=LMStage(phases=v3_lm_phases()),
        layout="grid",
        **kw,
    )


def _jsonable(cfg: BuildConfig) -> dict:
    d = asdict(cfg)
    d["work"] = str(cfg.work)
    d.pop("text_model")
    return d


def check_layout(cfg: BuildConfig) -> None:
    """A "slots" build needs a 6 x 6 token grid with one single word per column."""
    if cfg.layout not in LAYOUTS:
        raise McLlavaError(f"layout must be 'grid' or 'slots', got {cfg.layout!r}")
    if cfg.layout == "slots":
        grid = cfg.vision.image_size // cfg.vision.patch_size
        if grid != N_SLOTS or len(cfg.align.words) != grid or any("+" in w for w in cfg.align.words):
            raise McLlavaError(
                f"the slots layout needs a {N_SLOTS} x {N_SLOTS} token grid and {N_SLOTS} single align "
                f"words (one per token column); got a {grid} x {grid} grid and {cfg.align.words}"
            )
    elif any(p.oracle for p in cfg.lm.phases):
        raise McLlavaError("oracle LM phases need layout='slots'")
