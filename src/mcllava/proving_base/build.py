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

Each stage checkpoints into `work/<stage>/` and is skipped once its `done.json` exists; an interrupted stage
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import McLlavaError
from ..kmeans_init import covered_patches, rescale
from ..layout import LAYOUT_KEY
from ..tokens import word_embedding_norm
from .data import (GATE_DEFINITIONS, MIRROR_SLOTS, N_SLOTS, PATCH_TRAITS, VALUES, Curriculum, lm_sample,
                   patch_labels, scene_pool, to_pixels, trait_classes)
from .model import VisionSpec

DEFAULT_WORK = Path("~/.cache/mcllava/proving-base-build").expanduser()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class VisionStage:
    scenes: int = 40000  # 8,000 scenes were memorised (train 0.85 / held-out 0.51 category accuracy)
    steps: int = 5000  # 2,500 (13 min) ended at category 0.75 / build 0.71 / accessory 0.52; 5,000 (29 min): 0.83 / 0.79 / 0.66
    batch_size: int = 64
    lr: float = 2e-3
    device: str = "cpu"  # "cuda": the tower trains there, in bf16 autocast (align stays on the CPU; see LMStage.device)

    @classmethod
    def gpu(cls) -> "VisionStage":
        """About 2 minutes of one H100 after rendering. Measured with `VisionSpec.gpu()` (a 5,000-step schedule
        stopped at step 3,000, docs/proving_base.md): every trait of held-out characters read 0.06-0.14 better
        than the CPU default's tower (category 0.91, ears 0.67, eyes 0.78 against 0.83, 0.55, 0.64)."""
        return cls(scenes=48000, steps=3000, batch_size=256, device="cuda")


# The "slots" layout: image-token row r shows the character at scene slot r (`data._slot`: left / centre / right
# x near / far), one trait word per token in this order; an empty slot's row is the background word. A character
# then reads as six adjacent words ("cat red striped slim hat round"), like the text comparisons SmolLM2 learns in
# ~100 steps, instead of the median two patches the "grid" layout gives it (docs/proving_base.md, eighth session).
# The three traits left out (ears, head, accessory colour) change the fewest pixels.
SLOT_WORDS = ("category", "color", "pattern", "build", "accessory", "eyes")
LAYOUTS = ("grid", "slots")


@dataclass
class AlignStage:
    steps: int = 2000  # the projector alone on cached tower features (~3 min); 600 steps left it underfitted
    batch_size: int = 128
    lr: float = 2e-3
    # the word(s) each owned patch is aligned to, cycled over the grid by (row + col) % len(words), or superposed
    # ("category+color"). Measured in docs/proving_base.md: exact cycled words are read within ~100 LoRA steps
    # (colour too), superposed ones far more slowly
    words: tuple[str, ...] = ("category", "color")
    background_word: str = "grass"  # every background patch: this word at BACKGROUND_NORM of a word's norm
    # then tower and projector together from pixels (0: the tower stays as the vision stage left it): a projector
    # on the frozen tower blends cycled words (read like superposed ones); 1,500 steps here (~6 min) made them the
    # nearest word of their position for 0.80 (category) / 0.94 (colour) of held-out patches, read at 0.86 / 0.88
    tower_steps: int = 1500
    tower_lr: float = 1e-3
    tower_batch_size: int = 64
    heads_weight: float = 0.1  # the vision stage's trait-head loss, kept on while the tower is tuned


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
    """Read first, then describe, then compare (docs/proving_base.md has the runs behind each choice).

    read: "Is there a <category>?" only (category-word tokens are read at AUC ~0.89 in 75-100 steps this way;
    mixed with captions and other kinds from step 0 they were not, within 100); describe: captions and all
    question kinds, reading kept up; compare: one or two definitions, look-alikes, reading kept up.
    """
    return (Phase("read", 100, Curriculum(1, 0.0, (0, 1, 0, 0, 0, 0), (1, 0, 0, 0))),
            Phase("describe", 150, Curriculum(1, 0.0, (0.3, 0.7, 0, 0, 0, 0), (0.4, 0.2, 0.2, 0.2))),
            Phase("compare", 650, Curriculum(2, 0.6, (0.08, 0.15, 0.1, 0.27, 0.3, 0.1))))


def visual_phases(steps: int = 300, both: float = 0.0) -> tuple[Phase, ...]:
    """Continue a slots build on recognition and captions with *visual* definitions ("<x> is" + the k rows of
    another photo of x: the form personal concepts take), word definitions with look-alikes, captions and
    generic questions kept up, all on the tower's tokens. The first committed build (1,150 steps of
    `slots_phases()`) never trained the visual kinds (gate: visual definitions 0.71); 899 steps of this from
    it gave the second (0.79; docs/proving_base.md). `both`: the share of its recognition samples that ask about
    two names at once (`Curriculum.both`)."""
    mix = (0.1, 0.15, 0.05, 0.2, 0.35, 0.15)  # caption, vqa, text, defined, visual_defined, visual_caption
    return (Phase("visual", steps, Curriculum(2, 0.5, mix, (0.5, 1, 1.5, 1.5), both=both)),)


def slots_phases() -> tuple[Phase, ...]:
    """The "slots" layout's curriculum: compare in text first (w17: AUC 0.91 at 100 steps), then read, describe,
    ground one definition against easy negatives and compare 1-2 definitions against look-alikes, all on the
    exact slot words (oracle), then the same comparisons on the tower's own tokens; a second look-alike stretch
    on the slot words, and two on the tower's tokens with category and position questions weighed up (ninth
    session: the gate passed, definitions 0.74 -> 0.81 and generic questions 0.72 -> 0.80, docs/proving_base.md)."""
    look = Curriculum(2, 0.5, (0.1, 0.15, 0.1, 0.65, 0, 0))
    generic = (0.5, 1, 1.5, 1.5)  # exists, colour, category, position
    return (Phase("text", 100, Curriculum(1, 0.5, (0, 0, 1, 0, 0, 0))),
            Phase("read", 50, Curriculum(1, 0.0, (0, 1, 0, 0, 0, 0), (1, 0, 0, 0)), oracle=True),
            Phase("describe", 100, Curriculum(1, 0.0, (0.3, 0.7, 0, 0, 0, 0), (0.25, 0.25, 0.25, 0.25)), oracle=True),
            Phase("ground", 150, Curriculum(1, 0.0, (0.1, 0.15, 0.15, 0.6, 0, 0)), oracle=True),
            Phase("lookalike", 150, look, oracle=True),
            Phase("tower", 100, look),
            Phase("lookalike2", 200, look, oracle=True),
            Phase("tower2", 150, Curriculum(2, 0.5, (0.1, 0.25, 0.05, 0.6, 0, 0), generic)),
            Phase("tower3", 150, Curriculum(2, 0.5, (0.05, 0.2, 0.05, 0.7, 0, 0), generic)))


@dataclass
class LMStage:
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
    # whole run had decayed enough by step 100 to hold reading back (AUC 0.64 against 0.89 at a flat 1e-3)
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
    autocast: bool = True  # bf16 autocast on CPU: ~4x faster steps through SmolLM2 here
    progress: bool = True
    text_model: Callable | None = None  # tests: a factory (tokenizer -> small Llama) instead of SmolLM2


def _jsonable(cfg: BuildConfig) -> dict:
    d = asdict(cfg)
    d["work"] = str(cfg.work)
    d.pop("text_model")
    return d


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


# ============================================================================================ 1. vision
class CharacterHeads(torch.nn.Module):
    """Trait read-outs of each character from the mean of the patch tokens it owns, plus per-patch category.

    A character's traits are spread over its patches (the hat in one, the eyes in another); pooling over the
    owned patches lets each patch carry a part and the tokens together carry all of it, which is how the
    language model reads them too. Every patch also names its owner's category (or background).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.classes = trait_classes()
        self.head = torch.nn.Linear(hidden, sum(self.classes))

    def pooled(self, patches: torch.Tensor, owner: torch.Tensor, n_actors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean patch token per actor [B, A, H] and whether the actor owns any patch [B, A]."""
        onehot = (owner.unsqueeze(1) == torch.arange(n_actors, device=owner.device).view(1, -1, 1)).float()  # [B, A, P]
        count = onehot.sum(-1, keepdim=True)
        return onehot @ patches / count.clamp_min(1), count.squeeze(-1) > 0

    def forward(self, patches: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over (character, trait) pairs and (patch, category) pairs, and per-pair correctness."""
        pooled, owns = self.pooled(patches, owner, labels.shape[1])
        out_c, out_p = self.head(pooled), self.head(patches)
        y_c = labels.masked_fill(~owns.unsqueeze(-1), -100)
        y_p = patch_labels(labels, owner)[..., 0]
        losses, correct = [], []
        start = 0
        for j, n in enumerate(self.classes):
            pairs = [(out_c[..., start : start + n], y_c[..., j])]
            if j == 0:
                pairs.append((out_p[..., :n], y_p))
            for logits, y in pairs:
                keep = y != -100
                if keep.any():
                    losses.append(F.cross_entropy(logits[keep], y[keep]))
                    correct.append((logits[keep].argmax(-1) == y[keep]).float())
            start += n
        return torch.stack(losses).mean(), torch.cat(correct)


class SlotHeads(torch.nn.Module):
    """The "slots" layout's read-out: token (r, t) names trait `words[t]` of the character at slot r, or "empty".

    The projector maps each token on its own, so a token must itself carry the one word its position shows: the
    tower's last layer routes each character's traits to its slot's row (positions are fixed, so this is a
    learned look-up of "who stands there"), while the pooled per-character heads keep training an earlier layer.
    """

    def __init__(self, hidden: int, words: tuple[str, ...]):
        super().__init__()
        self.words = words
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(VALUES[w]) + 1) for w in words)  # + empty

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy over every token, and per word the correctness of the tokens of occupied slots.

        tokens: [B, N_SLOTS * W, hidden]; slots: [B, N_SLOTS, len(PATCH_TRAITS)] (-100: empty slot).
        """
        grid = tokens.view(len(tokens), N_SLOTS, len(self.words), -1)
        occupied = slots[..., 0] != -100  # [B, S]
        losses, correct = [], {}
        for t, (word, head) in enumerate(zip(self.words, self.heads)):
            y = slots[..., PATCH_TRAITS.index(word)].clone()
            y[~occupied] = len(VALUES[word])  # the "empty" class
            logits = head(grid[:, :, t])
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
            correct[word] = (logits.argmax(-1) == y)[occupied].float()
        return torch.stack(losses).mean(), correct


def vision_model(spec: VisionSpec):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=spec.hidden, intermediate_size=spec.hidden * 4, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.hidden,
    ))


def patch_tokens(tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens LLaVA takes from the tower: last layer, CLS dropped (vision_feature_layer=-1, "default")."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def stage_vision(cfg: BuildConfig) -> dict:
    st, work = cfg.vision_stage, cfg.work / "vision"
    if (info := _done(cfg.work, "vision")) is not None:
        return info
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dev = torch.device(st.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise McLlavaError(f"the vision stage asks for {st.device!r}, but torch sees no CUDA device here")
    pool_path = work / "pool.pt"
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=False)
    else:
        pool = scene_pool(cfg.seed, st.scenes, cfg.vision.image_size, cfg.vision.image_size // cfg.vision.patch_size,
                          progress=cfg.progress, workers=max(2, (os.cpu_count() or 2) - 1))
        _save_ckpt(pool_path, pool.__dict__)
        pool = pool.__dict__
    n_val = max(64, st.scenes // 20)
    tower, heads = vision_model(cfg.vision).to(dev), CharacterHeads(cfg.vision.hidden).to(dev)
    slot_heads = SlotHeads(cfg.vision.hidden, cfg.align.words).to(dev) if cfg.layout == "slots" else None
    if slot_heads is not None and pool.get("slots") is None:
        raise McLlavaError(f"{pool_path} was rendered without slot labels: delete it to render it again")
    params = list(tower.parameters()) + list(heads.parameters()) + (list(slot_heads.parameters()) if slot_heads else [])
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=st.lr, total_steps=st.steps, pct_start=0.05)
    step = 0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False, map_location=dev)
        tower.load_state_dict(s["tower"]), heads.load_state_dict(s["heads"]), opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])
        if slot_heads is not None:
            slot_heads.load_state_dict(s["slot_heads"])
        step = s["step"]
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t0 = time.time()
    bar = tqdm(total=st.steps, initial=step, desc="1/4 vision tower", disable=not cfg.progress)
    while step < st.steps:
        idx = torch.randint(n_val, st.scenes, (st.batch_size,), generator=gen)
        pixels = pool["pixels"][idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # mirrored scenes: patch owners mirror with them
        pixels[flip] = pixels[flip].flip(2)
        grid = cfg.vision.image_size // cfg.vision.patch_size
        owner = pool["owner"][idx].view(-1, grid, grid)
        owner[flip] = owner[flip].flip(2)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hidden = tower(pixel_values=normalise(pixels.to(dev)), output_hidden_states=True).hidden_states
        # "slots": the per-character heads read the layer below the last, whose tokens stay where their patches are
        patches = hidden[-2 if slot_heads is not None else -1][:, 1:].float()
        loss, correct = heads(patches, pool["labels"][idx].to(dev), owner.reshape(len(idx), -1).to(dev))
        if slot_heads is not None:
            slots = pool["slots"][idx]
            slots[flip] = slots[flip][:, MIRROR_SLOTS]
            slot_loss, slot_correct = slot_heads(hidden[-1][:, 1:].float(), slots.to(dev))
            loss = loss + slot_loss
            correct = torch.cat(list(slot_correct.values()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.mean().item():.3f}")
        if step % 50 == 0 or step == st.steps:
            _save_ckpt(ckpt, {"tower": tower.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                              "sched": sched.state_dict(), "step": step,
                              **({"slot_heads": slot_heads.state_dict()} if slot_heads is not None else {})})
            val = _vision_val(tower, heads, pool, n_val, slot_heads)
            _log(cfg.work, "vision", {"step": step, "loss": loss.item(), "train_acc": correct.mean().item(),
                                      **val, "seconds": time.time() - t0})
    bar.close()
    save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, work / "tower.safetensors")
    return _finish(cfg.work, "vision", {"steps": step, **_vision_val(tower, heads, pool, n_val, slot_heads), "device": st.device,
                                         "seconds": time.time() - t0})


@torch.no_grad()
def _vision_val(tower, heads, pool, n_val: int, slot_heads: SlotHeads | None = None) -> dict:
    """Held-out accuracy per trait of the characters (from their pooled patches) and per-patch category; with
    slot heads, per word the accuracy of the slot tokens of occupied slots (`val_slot_<word>`)."""
    tower.eval()
    dev = next(tower.parameters()).device
    hidden = [tower(pixel_values=normalise(pool["pixels"][i : min(i + 64, n_val)].to(dev)), output_hidden_states=True).hidden_states
              for i in range(0, n_val, 64)]
    feats = torch.cat([h[-2 if slot_heads is not None else -1][:, 1:] for h in hidden]).float()
    tower.train()
    slot_res = {}
    if slot_heads is not None:
        _, correct = slot_heads(torch.cat([h[-1][:, 1:] for h in hidden]).float(), pool["slots"][:n_val].to(dev))
        slot_res = {f"val_slot_{w}": c.mean().item() for w, c in correct.items()}
    labels, owner = pool["labels"][:n_val].to(dev), pool["owner"][:n_val].to(dev)
    pooled, owns = heads.pooled(feats, owner, labels.shape[1])
    out, res, start = heads.head(pooled), {}, 0
    for j, n in enumerate(heads.classes):
        y = labels[..., j]
        keep = (y != -100) & owns
        res[f"val_{PATCH_TRAITS[j]}"] = (out[..., start : start + n][keep].argmax(-1) == y[keep]).float().mean().item()
        start += n
    y_p = patch_labels(labels, owner)[..., 0]
    res["val_patch_category"] = (heads.head(feats)[..., : heads.classes[0]].argmax(-1) == y_p).float().mean().item()
    res["val_mean"] = float(np.mean(list(res.values())))
    return {**res, **slot_res}


# ============================================================================================ shared
def tokenizer_for(cfg: BuildConfig):
    from .model import proving_tokenizer

    return proving_tokenizer(cfg.work / "tokenizer")


def assemble(cfg: BuildConfig, tokenizer=None):
    """The LLaVA model of this build with its trained vision tower (and projector, once aligned)."""
    from .model import build_llava, load_smollm2

    tokenizer = tokenizer or tokenizer_for(cfg)
    text = cfg.text_model(tokenizer) if cfg.text_model is not None else load_smollm2()
    model, processor = build_llava(text, tokenizer, cfg.vision, seed=cfg.seed)
    if cfg.layout != "grid":  # Backbone (and every export) reads the token layout from the config
        setattr(model.config, LAYOUT_KEY, cfg.layout)
    tuned = cfg.work / "align" / "tower.safetensors"  # the align stage's tower, when it tuned it
    model.model.vision_tower.load_state_dict(load_file(tuned if tuned.exists() else cfg.work / "vision" / "tower.safetensors"))
    proj = cfg.work / "align" / "projector.safetensors"
    if proj.exists():
        model.model.multi_modal_projector.load_state_dict(load_file(proj))
    return model, processor


@torch.no_grad()
def tower_features(model, pixels_uint8: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Frozen vision-tower patch tokens of uint8 images ([B, N, hidden]); the projector runs later, with grads."""
    tower = model.model.vision_tower
    dev = next(tower.parameters()).device  # on the tower's device; the features come back to the CPU
    return torch.cat([patch_tokens(tower, normalise(pixels_uint8[i : i + batch].to(dev))).float().cpu()
                      for i in range(0, len(pixels_uint8), batch)])


# ============================================================================================ 2. align
# Each patch is aligned to ONE word embedding: an owned patch to its owner's trait word (`AlignStage.words`,
# cycled over the grid), a background patch to one fixed word at half a word's norm. Measured on the 40k-scene
# tower ("Is there a ...?", 300 held-out questions, LoRA only, projector frozen; docs/proving_base.md): the
# category word on every owned patch is read at AUC 0.85-0.90 after 100 steps; category/colour/pattern cycled over
# the grid 0.55 (the projector blends them: the frozen tower hardly tells grid position; as exact words they are
# read, 0.93 at 100 steps), a weighted mix of all trait words 0.56, and the old description-mean alignment with
# the projector trained along (norms drifted to 14-38) stayed at chance for 400 steps.
BACKGROUND_NORM = 0.5


def patch_word_trait(grid: int, n_words: int) -> torch.Tensor:
    """[grid*grid] index into the align words of the trait each patch position shows ((row + col) % n_words)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return ((r + c) % n_words).reshape(-1)


def word_vectors(model, tokenizer, words: list[str]) -> torch.Tensor:
    """[len(words), D]: each word's embedding (mean over its tokens, with a leading space), at a word's norm."""
    emb = model.get_input_embeddings().weight.detach().float()
    norm = word_embedding_norm(model, len(tokenizer))
    vecs = [emb[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0) for w in words]
    return torch.stack([v / v.norm() * norm for v in vecs])


def trait_word_vectors(model, tokenizer, trait: str) -> torch.Tensor:
    """[n_values, D]: the word of each value of a trait ("plush toy" -> " toy")."""
    from .data import VALUES

    return word_vectors(model, tokenizer, [v.split()[-1] for v in VALUES[trait]])


def _word_patches(labels: torch.Tensor, owner: torch.Tensor, words: tuple[str, ...]):
    """Per align word and trait in it: (trait, bool [n, P] owned patches that show it, their owners' values).

    A word "category+color" is a superposition: the same patches yield once per trait.
    """
    which = patch_word_trait(int(round(owner.shape[1] ** 0.5)), len(words))
    per_patch = patch_labels(labels, owner)  # [n, P, T]
    for j, word in enumerate(words):
        m = (owner >= 0) & (which[None] == j)
        for trait in word.split("+"):
            yield trait, m, per_patch[..., PATCH_TRAITS.index(trait)][m]


def patch_word_targets(model, tokenizer, labels: torch.Tensor, owner: torch.Tensor, words: tuple[str, ...] = ("category",),
                       background: str = "grass") -> torch.Tensor:
    """[n, P, D] align targets: each owned patch's trait word, each background patch the background word (scaled).

    labels: [n, MAX_ACTORS, len(PATCH_TRAITS)] per-character trait values; owner: [n, P] (-1 = background).
    A superposed word ("category+color") is the sum of its traits' words, rescaled to a word's norm.
    """
    norm = word_embedding_norm(model, len(tokenizer))
    bg = word_vectors(model, tokenizer, [background])[0] * BACKGROUND_NORM
    out = bg.expand(*owner.shape, -1).clone()
    owned = torch.zeros_like(out)
    for trait, m, values in _word_patches(labels, owner, words):
        owned[m] += trait_word_vectors(model, tokenizer, trait)[values]
    m = owner >= 0
    out[m] = owned[m] / owned[m].norm(dim=-1, keepdim=True) * norm
    return out


def slot_word_targets(model, tokenizer, slots: torch.Tensor, words: tuple[str, ...] = SLOT_WORDS,
                      background: str = "grass") -> torch.Tensor:
    """[n, N_SLOTS * len(words), D] align targets of the "slots" layout: token (r, t) is the word of trait
    `words[t]` of the character at slot r; every token of an empty slot the background word (scaled)."""
    bg = word_vectors(model, tokenizer, [background])[0] * BACKGROUND_NORM
    out = bg.expand(len(slots), N_SLOTS, len(words), -1).clone()
    occupied = slots[..., 0] != -100
    for t, word in enumerate(words):
        values = slots[..., PATCH_TRAITS.index(word)][occupied]
        out[:, :, t][occupied] = trait_word_vectors(model, tokenizer, word)[values]
    return out.reshape(len(slots), N_SLOTS * len(words), -1)


@torch.no_grad()
def slot_word_readout(model, tokenizer, tokens: torch.Tensor, slots: torch.Tensor,
                      words: tuple[str, ...] = SLOT_WORDS, background: str = "grass") -> dict[str, float]:
    """Per word of the "slots" layout: share of occupied slots' tokens closest (cosine) to the right word among
    all words of all traits shown, and share of empty slots' tokens closest to none of them but the background."""
    vocab = [F.normalize(trait_word_vectors(model, tokenizer, w), dim=-1) for w in words]
    offset = np.cumsum([0] + [len(v) for v in vocab])
    union = torch.cat(vocab + [F.normalize(word_vectors(model, tokenizer, [background]), dim=-1)])
    guess = (F.normalize(tokens.float(), dim=-1) @ union.T).argmax(-1).view(len(slots), N_SLOTS, len(words))
    occupied = slots[..., 0] != -100
    out = {w: round(float((guess[:, :, t][occupied] == slots[..., PATCH_TRAITS.index(w)][occupied] + int(offset[t]))
                          .float().mean()), 3) for t, w in enumerate(words)}
    out["empty"] = round(float((guess[~occupied] == len(union) - 1).float().mean()), 3)
    return out


def check_layout(cfg: BuildConfig) -> None:
    """A "slots" build needs a 6 x 6 token grid with one single word per column."""
    if cfg.layout not in LAYOUTS:
        raise McLlavaError(f"layout must be 'grid' or 'slots', got {cfg.layout!r}")
    if cfg.layout == "slots":
        grid = cfg.vision.image_size // cfg.vision.patch_size
        if grid != N_SLOTS or len(cfg.align.words) != grid or any("+" in w for w in cfg.align.words):
            raise McLlavaError(f"the slots layout needs a {N_SLOTS} x {N_SLOTS} token grid and {N_SLOTS} single align "
                               f"words (one per token column); got a {grid} x {grid} grid and {cfg.align.words}")
    elif any(p.oracle for p in cfg.lm.phases):
        raise McLlavaError("oracle LM phases need layout='slots'")


def _start(cfg: BuildConfig, stage: str):
    """Seed, make the stage folder, and assemble the model: (tokenizer, model, processor)."""
    (cfg.work / stage).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tok = tokenizer_for(cfg)
    return (tok, *assemble(cfg, tok))


def stage_align(cfg: BuildConfig) -> dict:
    st, work = cfg.align, cfg.work / "align"
    if (info := _done(cfg.work, "align")) is not None:
        return info
    tok, model, _ = _start(cfg, "align")
    pool = torch.load(cfg.work / "vision" / "pool.pt", weights_only=False)
    owner, labels, tower = pool["owner"], pool["labels"], model.model.vision_tower
    feats = tower_features(model, pool["pixels"])
    slots = cfg.layout == "slots"
    tgt = (slot_word_targets(model, tok, pool["slots"], st.words, st.background_word) if slots
           else patch_word_targets(model, tok, labels, owner, st.words, st.background_word))
    proj = model.model.multi_modal_projector
    n_val = max(64, len(owner) // 20)
    gen, t0 = torch.Generator().manual_seed(cfg.seed), time.time()

    def held_out(n: int = min(n_val, 256)) -> float:  # fresh tower features only while the tower is training
        tuning = next(tower.parameters()).requires_grad
        with torch.no_grad():
            x = tower_features(model, pool["pixels"][:n]) if tuning else feats[:n]
            return _align_loss(proj(x), tgt[:n]).item()

    def fit(params: list, steps: int, lr: float, batch: int, loss_fn: Callable, desc: str) -> None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        for step in tqdm(range(steps), desc=desc, disable=not cfg.progress):
            loss = loss_fn(torch.randint(n_val, len(owner), (batch,), generator=gen))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0:
                _log(cfg.work, "align", {"part": desc, "step": step + 1, "loss": loss.item(), "val_loss": held_out()})

    # what each token shows: an owned patch, or a token of an occupied slot; the rest shows the background word
    shown = (pool["slots"][..., 0] != -100).repeat_interleave(len(st.words), dim=1) if slots else owner >= 0

    def balanced(pred: torch.Tensor, target: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Shown tokens weigh as much as the background ones (most tokens of a slots grid are empty slots)."""
        return sum(_align_loss(pred[k], target[k]) for k in (m, ~m) if k.any())

    # (1) the projector alone, on cached tower features
    proj.requires_grad_(True)
    fit(list(proj.parameters()), st.steps, st.lr, st.batch_size,
        (lambda i: balanced(proj(feats[i]), tgt[i], shown[i])) if slots else (lambda i: _align_loss(proj(feats[i]), tgt[i])),
        "2/4 projector alignment")
    # (2) optionally the tower too, end to end from pixels: a frozen tower's patch features hardly tell a patch's
    # grid position, so a projector alone blends the words cycled over the grid (docs/proving_base.md), and a
    # projector alone on the slots tower read the words it shows less well than the tower's own heads. The vision
    # stage's heads stay on as a second loss so that the tower keeps every trait.
    if st.tower_steps > 0:
        vis = torch.load(cfg.work / "vision" / "ckpt.pt", weights_only=False)
        heads = CharacterHeads(cfg.vision.hidden)
        heads.load_state_dict(vis["heads"])
        extra = [heads]
        if slots:
            slot_heads = SlotHeads(cfg.vision.hidden, st.words)
            slot_heads.load_state_dict(vis["slot_heads"])
            extra.append(slot_heads)
        tower.requires_grad_(True)

        def joint_loss(i: torch.Tensor) -> torch.Tensor:
            hidden = tower(pixel_values=normalise(pool["pixels"][i]), output_hidden_states=True).hidden_states
            tokens = hidden[-1][:, 1:]
            align = balanced(proj(tokens), tgt[i], shown[i])
            if slots:  # as in the vision stage: per-character heads below the last layer, slot heads on it
                return align + st.heads_weight * (heads(hidden[-2][:, 1:], labels[i], owner[i])[0]
                                                  + slot_heads(tokens, pool["slots"][i])[0])
            return align + st.heads_weight * heads(tokens, labels[i], owner[i])[0]

        fit(list(proj.parameters()) + list(tower.parameters()) + [p for m in extra for p in m.parameters()],
            st.tower_steps, st.tower_lr, st.tower_batch_size, joint_loss, "2/4 tower + projector alignment")
        tower.requires_grad_(False)
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, work / "tower.safetensors")
        feats = tower_features(model, pool["pixels"][:n_val])
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, work / "projector.safetensors")
    with torch.no_grad():
        val = _align_loss(proj(feats[:n_val]), tgt[:n_val]).item()
        words = (slot_word_readout(model, tok, proj(feats[:n_val]), pool["slots"][:n_val], st.words, st.background_word) if slots
                 else word_readout(model, tok, proj(feats[:n_val]), labels[:n_val], owner[:n_val], st.words))
    return _finish(cfg.work, "align", {"steps": st.steps, "tower_steps": st.tower_steps, "val_loss": val,
                                       "held_out_word_accuracy": words, "seconds": time.time() - t0})


def _align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine to the target word plus a relative norm term, over every patch."""
    cos = F.cosine_similarity(pred, target, dim=-1)
    rel = (pred.norm(dim=-1) - target.norm(dim=-1)) / target.norm(dim=-1)
    return (1 - cos).mean() + 0.1 * (rel**2).mean()


@torch.no_grad()
def word_readout(model, tokenizer, tokens: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                 words: tuple[str, ...] = ("category",)) -> dict[str, float]:
    """Per align trait: share of its patches whose token is closest (cosine) to the right word.

    Cycled words compete against every word of every cycled trait (a blend of the category and colour words
    is wrong on both); a superposed word's traits are each read among their own words.
    """
    traits = [t for w in words for t in w.split("+")]
    vocab = {t: F.normalize(trait_word_vectors(model, tokenizer, t), dim=-1) for t in traits}
    offset = {t: sum(len(vocab[u]) for u in traits[:j]) for j, t in enumerate(traits)}
    union = torch.cat([vocab[t] for t in traits])
    superposed = {t for w in words if "+" in w for t in w.split("+")}
    out = {}
    for trait, m, values in _word_patches(labels, owner, words):
        tok = F.normalize(tokens[m].float(), dim=-1)
        guess = (tok @ vocab[trait].T).argmax(-1) + offset[trait] if trait in superposed else (tok @ union.T).argmax(-1)
        out[trait] = round(float((guess == values + offset[trait]).float().mean()), 3)
    return out


# ============================================================================================ 3. lm
def add_lora(model, rank: int, alpha: int, projector: bool = True):
    """LoRA on every attention and MLP matrix of the language model (in place); the projector trains if asked."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = model.model.language_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)), lm)
    model.requires_grad_(False)
    for n, p in lm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(projector)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora_delta(model, path: Path, rank: int, alpha: int) -> int:
    """Start the LoRA from an export's `lm_delta.safetensors` (continuing a build); returns the factors loaded."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if (int(meta.get("lora_rank", rank)), int(meta.get("lora_alpha", alpha))) != (rank, alpha):
            raise McLlavaError(f"{path} holds a rank {meta.get('lora_rank')} / alpha {meta.get('lora_alpha')} LoRA; "
                               f"this build's LoRA is rank {rank} / alpha {alpha}")
        delta = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.model.language_model.named_parameters())
    missing = [k for k in delta if f"{k}.default.weight" not in params]
    if missing or len(delta) != sum("lora_" in n for n in params):
        raise McLlavaError(f"{path} does not fit this model's LoRA (e.g. {missing[:2]})")
    with torch.no_grad():
        for k, v in delta.items():
            params[f"{k}.default.weight"].copy_(v.float())
    return len(delta)


@dataclass
class EncodedPool:
    """A pre-encoded pool: padded ids, masks, labels, frozen tower features and per-sample facts.

    Visual definitions: `ref_features` holds the tower features of each defined name's reference photo and
    `ref_weights` the k-means cluster memberships of its masked patches (row-normalised), so that a slot's k
    rows are the cluster means of the *projected* tokens, as `kmeans_init` makes a concept's rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor  # [n, N, hidden] (zeros for text-only samples)
    has_image: torch.Tensor
    kinds: list[str]
    answers: list[str]
    ref_features: torch.Tensor | None = None  # [n, R, N, hidden]
    ref_weights: torch.Tensor | None = None  # [n, R, k, N]
    n_refs: torch.Tensor | None = None  # [n]
    changed: list[tuple[str, ...]] | None = None  # per sample: the traits its look-alike negative changes, or ()
    oracle: torch.Tensor | None = None  # [n, N, D] "slots" layout: the exact align targets of each image


def cluster_weights(feats: torch.Tensor, coverage: np.ndarray, k: int, seed: int = 0) -> torch.Tensor:
    """[k, N] row-normalised memberships of k-means clusters over the patches a reference mask covers."""
    from sklearn.cluster import KMeans

    idx = np.flatnonzero(covered_patches(torch.from_numpy(coverage)).numpy())  # the patches kmeans_init would use
    w = torch.zeros(k, len(coverage))
    if len(idx) <= k:
        for j in range(k):
            w[j, idx[j % len(idx)]] = 1.0
    else:
        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(feats[idx].numpy()).labels_
        sizes = np.bincount(labels, minlength=k)
        for rank, j in enumerate(np.argsort(-sizes, kind="stable")):  # the largest cluster first, as kmeans_rows
            w[rank, idx[labels == j]] = 1.0
    return w / w.sum(1, keepdim=True)


def encode_pool(bb, model, samples: list[dict], size: int, rows: int = 4, words: tuple[str, ...] | None = None
                ) -> EncodedPool:
    """Tokenise and pre-encode samples; with `words` (the "slots" layout) also their exact image rows (`oracle`)."""
    from ..training_data import collate

    enc = [bb.encode(bb.format_prompt(s["question"], s.get("system"), image=s["image"] is not None), s["answer"],
                     definition_rows=rows) for s in samples]
    batch = collate(enc, [None] * len(enc), bb.tokenizer.pad_token_id)
    pixels = torch.from_numpy(np.stack([to_pixels(s["image"], size) for s in samples]))
    pool = EncodedPool(batch.input_ids, batch.attention_mask, batch.labels, tower_features(model, pixels),
                       torch.tensor([s["image"] is not None for s in samples]), [s["kind"] for s in samples],
                       [s["answer"] for s in samples], changed=[tuple(s.get("changed", ())) for s in samples])
    if words is not None:
        empty = np.full((N_SLOTS, len(PATCH_TRAITS)), -100)  # text-only samples: rows never used
        slots = torch.from_numpy(np.stack([s.get("slots", empty) for s in samples]))
        pool.oracle = slot_word_targets(model, bb.tokenizer, slots.to(bb.device), words).cpu()
    refs = [s.get("refs") or [] for s in samples]
    r_max = max(len(r) for r in refs)
    if r_max:
        n, grid = len(samples), int(round(pool.features.shape[1] ** 0.5))
        flat = [(i, j, img, cov) for i, r in enumerate(refs) for j, (img, cov) in enumerate(r)]
        feats = tower_features(model, torch.from_numpy(np.stack([to_pixels(img, size) for _, _, img, _ in flat])))
        pool.ref_features = torch.zeros(n, r_max, *pool.features.shape[1:])
        pool.ref_weights = torch.zeros(n, r_max, rows, grid * grid)
        coverage = bb.mask_coverage([mask for *_, mask in flat], [img for _, _, img, _ in flat])  # through the layout
        for (i, j, _, _), f, cov in zip(flat, feats, coverage):
            pool.ref_features[i, j] = f
            pool.ref_weights[i, j] = cluster_weights(f, cov.numpy(), rows, seed=i)
        pool.n_refs = torch.tensor([len(r) for r in refs])
    return pool


def _draw(args: tuple) -> dict:
    return lm_sample(*args)


def make_pool(cfg: BuildConfig, bb, model, cur: Curriculum, start: int, n: int, seed: int, half: str = "base",
              desc: str = "pool") -> EncodedPool:
    jobs = [(seed, start + i, cur, cfg.vision.image_size, half) for i in range(n)]
    bar = dict(desc=desc, total=n, disable=not cfg.progress, mininterval=5)
    if cfg.lm.workers > 1:  # each sample depends only on its index: the same pool, drawn in parallel
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cfg.lm.workers) as ex:
            samples = list(tqdm(ex.map(_draw, jobs, chunksize=64), **bar))
    else:
        samples = [_draw(j) for j in tqdm(jobs, **bar)]
    return encode_pool(bb, model, samples, cfg.vision.image_size, cfg.lm.definition_rows,
                       cfg.align.words if cfg.layout == "slots" else None)


def sample_features(bb, pool: EncodedPool, idx: torch.Tensor, norm: float, oracle: bool = False) -> torch.Tensor | None:
    """Rows for every placeholder of the samples `idx`, in sequence order: definition slots, then the image
    (the projected tower tokens, or with `oracle` the pool's exact align targets)."""
    proj = bb.model.model.multi_modal_projector
    dev = next(proj.parameters()).device  # pools stay on the CPU; rows go where the model is
    chunks = []
    for i in idx.tolist():
        if pool.n_refs is not None and pool.n_refs[i] > 0:
            r = int(pool.n_refs[i])
            refs = torch.einsum("rkp,rpd->rkd", pool.ref_weights[i, :r].to(dev), proj(pool.ref_features[i, :r].to(dev)))
            refs = refs.reshape(-1, refs.shape[-1])
            chunks.append(rescale(refs, norm))
        if pool.has_image[i]:
            chunks.append(pool.oracle[i].to(dev) if oracle else proj(pool.features[i].to(dev)))
    return torch.cat(chunks) if chunks else None


def lm_loss(bb, pool: EncodedPool, idx: torch.Tensor, norm: float, oracle: bool = False) -> torch.Tensor:
    width = int(pool.attention_mask[idx].sum(1).max())
    ids, mask, labels = (t[idx, :width].to(bb.device) for t in (pool.input_ids, pool.attention_mask, pool.labels))
    return bb.answer_loss(ids, mask, labels, sample_features(bb, pool, idx, norm, oracle))


@torch.no_grad()
def yes_no_scores(bb, pool: EncodedPool, batch: int = 32, features: Callable | None = None) -> torch.Tensor:
    """logit(Yes) - logit(No) at the first answer position of every sample of a pool.

    `features(idx)` gives the placeholder rows of samples `idx` (default: `sample_features`, the pool's projected
    tower features and visual definitions)."""
    yes, no = bb.answer_token_id("Yes"), bb.answer_token_id("No")
    norm = word_embedding_norm(bb.model, len(bb.tokenizer))
    features = features or (lambda idx: sample_features(bb, pool, idx, norm))
    out = []
    for i in range(0, len(pool.kinds), batch):
        idx = torch.arange(i, min(i + batch, len(pool.kinds)))
        prompt_len = (pool.labels[idx] == -100).logical_and(pool.attention_mask[idx] == 1).sum(1)
        width = int(prompt_len.max())
        ids, mask = pool.input_ids[idx, :width], (torch.arange(width)[None] < prompt_len[:, None]).long()
        ids, mask = (ids * mask + bb.tokenizer.pad_token_id * (1 - mask)).to(bb.device), mask.to(bb.device)
        h = bb.hidden_states(bb.embed(ids, features(idx)), mask)
        last = h[torch.arange(len(idx), device=h.device), (prompt_len - 1).to(h.device)]
        logits = bb.model.get_output_embeddings()(last).float()
        out.append((logits[:, yes] - logits[:, no]).cpu())
    return torch.cat(out)


def yes_no_report(scores: torch.Tensor, pool: EncodedPool) -> dict:
    """Weighted accuracy (mean of Yes recall and No recall) per kind of Yes/No sample."""
    res = {}
    for kind in sorted(set(pool.kinds)):
        sel = [i for i, (k, a) in enumerate(zip(pool.kinds, pool.answers)) if k == kind and a in ("Yes", "No")]
        if not sel:
            continue
        pos = [scores[i] > 0 for i in sel if pool.answers[i] == "Yes"]
        neg = [scores[i] <= 0 for i in sel if pool.answers[i] == "No"]
        recalls = [float(np.mean(x)) for x in (pos, neg) if x]
        ys = [pool.answers[i] == "Yes" for i in sel]
        auc = None
        if 0 < sum(ys) < len(ys):  # discrimination apart from calibration: is every Yes scored above every No?
            from sklearn.metrics import roc_auc_score

            auc = float(roc_auc_score(ys, [scores[i].item() for i in sel]))
        res[kind] = {"n": len(sel), "weighted_accuracy": float(np.mean(recalls)), "auc": auc,
                     "positive_recall": float(np.mean(pos)) if pos else None,
                     "negative_recall": float(np.mean(neg)) if neg else None}
        look = [i for i in sel if pool.changed and pool.changed[i]]
        if look:  # which differences the model sees: a look-alike changes one or two traits of the named character
            res[kind]["lookalike_negative_recall"] = float(np.mean([scores[i].item() <= 0 for i in look]))
            by_trait = {t: [scores[i].item() <= 0 for i in look if t in pool.changed[i]]
                        for t in sorted({t for i in look for t in pool.changed[i]})}
            res[kind]["lookalike_recall_by_trait"] = {t: {"n": len(v), "recall": float(np.mean(v))} for t, v in by_trait.items()}
    return res


def stage_lm(cfg: BuildConfig) -> dict:
    from ..backbone import Backbone

    st, work = cfg.lm, cfg.work / "lm"
    if (info := _done(cfg.work, "lm")) is not None:
        return info
    tok, model, processor = _start(cfg, "lm")
    bb = Backbone(model, processor, "proving-ground-build")
    add_lora(model, st.lora_rank, st.lora_alpha, projector=st.lr_projector > 0)
    if st.init_from is not None:
        load_lora_delta(model, Path(st.init_from) / "lm_delta.safetensors", st.lora_rank, st.lora_alpha)
    dev = torch.device(st.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise McLlavaError(f"the LM stage asks for {st.device!r}, but torch sees no CUDA device here")
    model.to(dev).train()  # pools are drawn on the CPU and kept there; their tower features come from `dev`
    pools: dict[str, EncodedPool] = {}
    # held out: recognition with text, word and visual definitions ("val"; only Yes/No samples are scored, so no
    # generic questions), and "Is there a ...?" alone ("val_read": is the image read at all?)
    # the recognition samples are drawn as the gate draws its definitions (1-2 definitions, half of the negatives
    # look-alikes), whatever the phases are, so that the curve predicts the gate
    val_cur = replace(GATE_DEFINITIONS, mix=(0, 0, 0.1, 0.25, 0.25, 0))
    read_cur = Curriculum(mix=(0, 1, 0, 0, 0, 0), questions=(1, 0, 0, 0))  # "Is there a ...?" only
    wanted = [(p.name, p.curriculum, (i + 1) * 10**6, min(st.pool, p.steps * st.batch_size))
              for i, p in enumerate(st.phases) if p.steps > 0]
    wanted += [("val", val_cur, 10**8, st.val_pool), ("val_read", read_cur, 10**8 + 10**6, st.val_read)]
    for name, cur, start, n in wanted:  # each pool's samples come from its own index range
        path, spec = work / f"pool_{name}.pt", {"curriculum": asdict(cur), "start": start, "n": n, "seed": cfg.seed}
        saved = torch.load(path, weights_only=False) if path.exists() else {}
        if saved.pop("spec", None) == spec:
            pools[name] = EncodedPool(**saved)
        else:  # none yet, or drawn for other phases (a run continued from another's checkpoint): draw it again
            pools[name] = make_pool(cfg, bb, model, cur, start, n, cfg.seed, desc=f"3/4 encode pool {name}")
            _save_ckpt(path, {**pools[name].__dict__, "spec": spec})
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    proj = [p for p in model.model.multi_modal_projector.parameters() if p.requires_grad]
    groups = [{"params": lora, "lr": st.lr_lora}] + ([{"params": proj, "lr": st.lr_projector}] if proj else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = st.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, st.lr_factor)
    step, ckpt = 0, work / "ckpt.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False, map_location=dev)
        model.load_state_dict(s["trainable"], strict=False)
        opt.load_state_dict(s["opt"]), sched.load_state_dict(s["sched"])
        step = s["step"]
    t0, losses, norm = time.time(), [], word_embedding_norm(model, len(tok))
    bar = tqdm(total=total, initial=step, desc="3/4 projector + LoRA", disable=not cfg.progress)
    while step < total:
        current = st.phases[st.phase_at(step)]
        phase, oracle = current.name, current.oracle
        pool = pools[phase]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(0, len(pool.kinds), (st.batch_size,), generator=gen)
        with _autocast(cfg, st.device):
            loss = lm_loss(bb, pool, idx, norm, oracle)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + proj, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        record = {"step": step, "phase": phase, "loss": float(np.mean(losses[-st.checkpoint_every:])), "seconds": time.time() - t0}
        if step % st.eval_every == 0 or step == total:
            model.eval()
            record["tokens"] = "oracle" if oracle else "tower"  # the held-out pools are scored on the phase's tokens
            def report(p: EncodedPool) -> dict:
                return yes_no_report(yes_no_scores(bb, p, features=lambda idx: sample_features(bb, p, idx, norm, oracle)), p)

            with _autocast(cfg, st.device):
                record["val"] = report(pools["val"])
                record["val"]["exists"] = report(pools["val_read"])["exists"]
            model.train()
            tqdm.write(f"step {step}: " + json.dumps({k: (round(v["weighted_accuracy"], 3), round(v["auc"] or 0, 3))
                                                      for k, v in record["val"].items()}))
        out_of_time = st.time_budget is not None and time.time() - t0 > st.time_budget
        if step % st.checkpoint_every == 0 or step == total or "val" in record or out_of_time:
            _log(cfg.work, "lm", record)
            _save_ckpt(ckpt, {"trainable": trainable_state(model), "opt": opt.state_dict(),
                              "sched": sched.state_dict(), "step": step})
        if out_of_time:
            tqdm.write(f"time budget of {st.time_budget:.0f} s spent: the LM stage ends at step {step} of {total}")
            break
    bar.close()
    state = trainable_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, work / "trainable.safetensors")
    return _finish(cfg.work, "lm", {"steps": step, "planned_steps": total, "seconds": time.time() - t0,
                                    "final_loss": float(np.mean(losses[-20:])) if losses else None,
                                    "device": st.device, "init_from": st.init_from})


# ============================================================================================ 4. export
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
    vision.update({k.replace("model.multi_modal_projector.", "multi_modal_projector."): v  # trained in the LM stage
                   for k, v in state.items() if "multi_modal_projector" in k})
    delta = {k.replace("model.language_model.", "").replace(".default.weight", ""): v
             for k, v in state.items() if "lora_" in k}
    meta = {"lora_rank": str(cfg.lm.lora_rank), "lora_alpha": str(cfg.lm.lora_alpha)}
    save_file({k: v.to(torch.float16).contiguous() for k, v in vision.items()}, out / "vision.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in delta.items()}, out / "lm_delta.safetensors", metadata=meta)
    cfg_dict = model.config.to_dict()
    cfg_dict["text_config"].pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    processor.save_pretrained(out / "processor")
    info = {"vision_stage": _done(cfg.work, "vision"), "align_stage": _done(cfg.work, "align"),
            "lm_stage": _done(cfg.work, "lm") or {"interrupted_at_step": lm_steps}, "config": _jsonable(cfg)}
    (out / "build.json").write_text(json.dumps(info, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "bytes": size}


def work_from_weights(weights: str | Path, work: Path) -> None:
    """Seed a build folder with an export's vision tower and projector, so that an LM stage can continue it
    (with `LMStage.init_from` set to the same folder) without the vision and align stages."""
    vision = load_file(Path(weights) / "vision.safetensors")
    for part, prefix in (("tower", "vision_tower."), ("projector", "multi_modal_projector.")):
        state = {k[len(prefix):]: v.float().contiguous() for k, v in vision.items() if k.startswith(prefix)}
        if not state:
            raise McLlavaError(f"{Path(weights) / 'vision.safetensors'} has no {prefix}* tensors")
        (work / "align").mkdir(parents=True, exist_ok=True)
        save_file(state, work / "align" / f"{part}.safetensors")


def build(cfg: BuildConfig, stages: tuple[str, ...] = ("vision", "align", "lm", "export"), out: Path | None = None) -> dict:
    """Run (or resume) the stages in order; returns each stage's summary."""
    check_layout(cfg)
    cfg.work.mkdir(parents=True, exist_ok=True)
    (cfg.work / "config.json").write_text(json.dumps(_jsonable(cfg), indent=1))
    res = {}
    for name in stages:
        fn = {"vision": stage_vision, "align": stage_align, "lm": stage_lm}.get(name)
        res[name] = fn(cfg) if fn else stage_export(cfg, out)
    return res
