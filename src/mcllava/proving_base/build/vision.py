"""Stage 1, vision: a CLIP ViT trained from scratch on world scenes with per-character trait heads."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...errors import McLlavaError
from ...world.render import HELD_OBJECTS
from ...world.scenes import SETTINGS
from ..data import (
    LABEL_TRAITS,
    MIRROR_SLOTS,
    N_SLOTS,
    PATCH_TRAITS,
    VALUES,
    full_labels,
    patch_labels,
    scene_pool,
    trait_classes,
)
from .common import _done, _finish, _log, _save_ckpt, normalise, vision_model
from .config import BuildConfig


class CharacterHeads(torch.nn.Module):
    """Trait read-outs of each character from the mean of the patch tokens it owns, plus per-patch category.

    A character's traits are spread over its patches (the hat in one, the eyes in another); pooling over the
    owned patches lets each patch carry a part and the tokens together carry all of it, which is how the
    language model reads them too. Every patch also names its owner's category (or background). `traits` are
    columns of `LABEL_TRAITS` (the version-3 tower adds action and held object); with `setting`, the mean of the
    background patches names the scene's setting. With the held object among the traits, a second per-patch head
    names the object each patch shows (`held_patch_labels`), so that the few patches of a small object learn it.
    """

    def __init__(self, hidden: int, traits: tuple[str, ...] = PATCH_TRAITS, setting: bool = False):
        super().__init__()
        self.traits, self.classes = tuple(traits), trait_classes(tuple(traits))
        if self.traits[0] != "category":
            raise McLlavaError(f"the vision heads' first trait must be category (per-patch), got {self.traits}")
        self.head = torch.nn.Linear(hidden, sum(self.classes))
        self.setting = torch.nn.Linear(hidden, len(SETTINGS)) if setting else None
        self.held_patch = torch.nn.Linear(hidden, len(HELD_OBJECTS) + 1) if "held" in self.traits else None

    def labels(self, pool: dict, idx=slice(None)) -> torch.Tensor:
        """The pool's per-actor labels of `self.traits` ([n, MAX_ACTORS, len(traits)])."""
        full = full_labels(pool)
        if any(LABEL_TRAITS.index(t) >= full.shape[-1] for t in self.traits):
            raise McLlavaError("the scene pool was rendered without action / held labels: delete pool.pt to render it")
        return full[idx][..., [LABEL_TRAITS.index(t) for t in self.traits]]

    def pooled(self, patches: torch.Tensor, owner: torch.Tensor, n_actors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean patch token per actor [B, A, H] and whether the actor owns any patch [B, A]."""
        onehot = (owner.unsqueeze(1) == torch.arange(n_actors, device=owner.device).view(1, -1, 1)).float()  # [B, A, P]
        count = onehot.sum(-1, keepdim=True)
        return onehot @ patches / count.clamp_min(1), count.squeeze(-1) > 0

    def background(self, patches: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Setting logits from the mean background patch [B, len(SETTINGS)], and whether any patch is background."""
        bg = (owner < 0).float().unsqueeze(-1)
        mean = (bg * patches).sum(1) / bg.sum(1).clamp_min(1)
        return self.setting(mean), bg.sum((1, 2)) > 0

    def held_patch_loss(self, patches: torch.Tensor, held_patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch held-object loss, balanced: the mean over patches that show an object and the mean over
        owned patches that show none count the same (an object is one or two patches of a character's dozens);
        and the correctness on patches that show an object."""
        logits, none = self.held_patch(patches), len(HELD_OBJECTS)
        shown, empty = (held_patch >= 0) & (held_patch < none), held_patch == none
        parts = [F.cross_entropy(logits[m], held_patch[m]) for m in (shown, empty) if m.any()]
        return torch.stack(parts).mean(), (logits[shown].argmax(-1) == held_patch[shown]).float()

    def forward(
        self,
        patches: torch.Tensor,
        labels: torch.Tensor,
        owner: torch.Tensor,
        setting: torch.Tensor | None = None,
        held_patch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over (character, trait) pairs, (patch, category) pairs and, with a setting head,
        the scenes' settings, plus the per-patch held-object loss where `held_patch` labels are given; and
        per-pair correctness."""
        pooled, owns = self.pooled(patches, owner, labels.shape[1])
        out_c, out_p = self.head(pooled), self.head(patches)
        y_c = labels.masked_fill(~owns.unsqueeze(-1), -100)
        y_p = patch_labels(labels, owner)[..., 0]
        pairs = []
        start = 0
        for j, n in enumerate(self.classes):
            pairs.append((out_c[..., start : start + n], y_c[..., j]))
            if j == 0:
                pairs.append((out_p[..., :n], y_p))
            start += n
        if self.setting is not None and setting is not None:
            logits, any_bg = self.background(patches, owner)
            pairs.append((logits, setting.masked_fill(~any_bg, -100)))
        losses, correct = [], []
        for logits, y in pairs:
            keep = y != -100
            if keep.any():
                losses.append(F.cross_entropy(logits[keep], y[keep]))
                correct.append((logits[keep].argmax(-1) == y[keep]).float())
        if self.held_patch is not None and held_patch is not None and (held_patch != -100).any():
            loss, right = self.held_patch_loss(patches, held_patch)
            losses.append(loss), correct.append(right)
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


def character_heads(cfg: BuildConfig) -> CharacterHeads:
    """The vision stage's heads as the build configures them (`VisionStage.traits`, `VisionStage.setting`)."""
    return CharacterHeads(cfg.vision.hidden, cfg.vision_stage.traits, cfg.vision_stage.setting)


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
        pool = scene_pool(
            cfg.seed,
            st.scenes,
            cfg.vision.image_size,
            cfg.vision.image_size // cfg.vision.patch_size,
            progress=cfg.progress,
            workers=max(2, (os.cpu_count() or 2) - 1),
            held="held" in st.traits,  # a character's patches then include what it holds
        )
        _save_ckpt(pool_path, pool.__dict__)
        pool = pool.__dict__
    n_val = max(64, st.scenes // 20)
    tower, heads = vision_model(cfg.vision).to(dev), character_heads(cfg).to(dev)
    labels = heads.labels(pool)
    setting = pool.get("setting") if heads.setting is not None else None
    if heads.setting is not None and setting is None:
        raise McLlavaError(f"{pool_path} was rendered without setting labels: delete it to render it again")
    held_patch = pool.get("held_patch") if heads.held_patch is not None else None
    if heads.held_patch is not None and held_patch is None:
        raise McLlavaError(f"{pool_path} was rendered without per-patch held objects: delete it to render it again")
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
        shows = None if held_patch is None else held_patch[idx].view(-1, grid, grid)
        if shows is not None:
            shows[flip] = shows[flip].flip(2)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hidden = tower(pixel_values=normalise(pixels.to(dev)), output_hidden_states=True).hidden_states
        # "slots": the per-character heads read the layer below the last, whose tokens stay where their patches are
        patches = hidden[-2 if slot_heads is not None else -1][:, 1:].float()
        loss, correct = heads(
            patches,
            labels[idx].to(dev),
            owner.reshape(len(idx), -1).to(dev),
            None if setting is None else setting[idx].to(dev),
            None if shows is None else shows.reshape(len(idx), -1).to(dev),
        )
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
            _save_ckpt(
                ckpt,
                {
                    "tower": tower.state_dict(),
                    "heads": heads.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    **({"slot_heads": slot_heads.state_dict()} if slot_heads is not None else {}),
                },
            )
            val = _vision_val(tower, heads, pool, n_val, slot_heads)
            _log(
                cfg.work,
                "vision",
                {
                    "step": step,
                    "loss": loss.item(),
                    "train_acc": correct.mean().item(),
                    **val,
                    "seconds": time.time() - t0,
                },
            )
    bar.close()
    save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, work / "tower.safetensors")
    return _finish(
        cfg.work,
        "vision",
        {
            "steps": step,
            **_vision_val(tower, heads, pool, n_val, slot_heads),
            "device": st.device,
            "seconds": time.time() - t0,
        },
    )


@torch.no_grad()
def _vision_val(tower, heads, pool, n_val: int, slot_heads: SlotHeads | None = None) -> dict:
    """Held-out accuracy per trait of the characters (from their pooled patches) and per-patch category; with
    slot heads, per word the accuracy of the slot tokens of occupied slots (`val_slot_<word>`)."""
    tower.eval()
    dev = next(tower.parameters()).device
    hidden = [
        tower(
            pixel_values=normalise(pool["pixels"][i : min(i + 64, n_val)].to(dev)), output_hidden_states=True
        ).hidden_states
        for i in range(0, n_val, 64)
    ]
    feats = torch.cat([h[-2 if slot_heads is not None else -1][:, 1:] for h in hidden]).float()
    tower.train()
    slot_res = {}
    if slot_heads is not None:
        _, correct = slot_heads(torch.cat([h[-1][:, 1:] for h in hidden]).float(), pool["slots"][:n_val].to(dev))
        slot_res = {f"val_slot_{w}": c.mean().item() for w, c in correct.items()}
    labels, owner = heads.labels(pool, slice(0, n_val)).to(dev), pool["owner"][:n_val].to(dev)
    pooled, owns = heads.pooled(feats, owner, labels.shape[1])
    out, res, start = heads.head(pooled), {}, 0
    for j, n in enumerate(heads.classes):
        y = labels[..., j]
        keep = (y != -100) & owns
        res[f"val_{heads.traits[j]}"] = (out[..., start : start + n][keep].argmax(-1) == y[keep]).float().mean().item()
        start += n
    if heads.setting is not None:
        logits, any_bg = heads.background(feats, owner)
        y = pool["setting"][:n_val].to(dev)
        res["val_setting"] = (logits.argmax(-1) == y)[any_bg].float().mean().item()
    if heads.held_patch is not None and pool.get("held_patch") is not None:
        res["val_patch_held"] = heads.held_patch_loss(feats, pool["held_patch"][:n_val].to(dev))[1].mean().item()
    y_p = patch_labels(labels, owner)[..., 0]
    res["val_patch_category"] = (heads.head(feats)[..., : heads.classes[0]].argmax(-1) == y_p).float().mean().item()
    res["val_mean"] = float(np.mean(list(res.values())))
    return {**res, **slot_res}
