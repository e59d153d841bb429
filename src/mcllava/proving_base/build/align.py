"""Stage 2, align: fit LLaVA's projector (then tower and projector together) so that image tokens read as words."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...tokens import word_embedding_norm
from ..data import N_SLOTS, PATCH_TRAITS, VALUES, patch_labels
from .common import _done, _finish, _log, _start, normalise, tower_features
from .config import SLOT_WORDS, BuildConfig
from .vision import CharacterHeads, SlotHeads

# Each patch is aligned to ONE word embedding: an owned patch to its owner's trait word (`AlignStage.words`,
# cycled over the grid), a background patch to one fixed word at half a word's norm. The language model reads
# exact single words within a few LoRA steps, blends and mixtures far more slowly (docs/proving_base.md).
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


def patch_word_targets(
    model,
    tokenizer,
    labels: torch.Tensor,
    owner: torch.Tensor,
    words: tuple[str, ...] = ("category",),
    background: str = "grass",
) -> torch.Tensor:
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


def slot_word_targets(
    model, tokenizer, slots: torch.Tensor, words: tuple[str, ...] = SLOT_WORDS, background: str = "grass"
) -> torch.Tensor:
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
def slot_word_readout(
    model,
    tokenizer,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    words: tuple[str, ...] = SLOT_WORDS,
    background: str = "grass",
) -> dict[str, float]:
    """Per word of the "slots" layout: share of occupied slots' tokens closest (cosine) to the right word among
    all words of all traits shown, and share of empty slots' tokens closest to none of them but the background."""
    vocab = [F.normalize(trait_word_vectors(model, tokenizer, w), dim=-1) for w in words]
    offset = np.cumsum([0] + [len(v) for v in vocab])
    union = torch.cat(vocab + [F.normalize(word_vectors(model, tokenizer, [background]), dim=-1)])
    guess = (F.normalize(tokens.float(), dim=-1) @ union.T).argmax(-1).view(len(slots), N_SLOTS, len(words))
    occupied = slots[..., 0] != -100
    out = {
        w: round(
            float(
                (guess[:, :, t][occupied] == slots[..., PATCH_TRAITS.index(w)][occupied] + int(offset[t]))
                .float()
                .mean()
            ),
            3,
        )
        for t, w in enumerate(words)
    }
    out["empty"] = round(float((guess[~occupied] == len(union) - 1).float().mean()), 3)
    return out


def stage_align(cfg: BuildConfig) -> dict:
    st, work = cfg.align, cfg.work / "align"
    if (info := _done(cfg.work, "align")) is not None:
        return info
    tok, model, _ = _start(cfg, "align")
    pool = torch.load(cfg.work / "vision" / "pool.pt", weights_only=False)
    owner, labels, tower = pool["owner"], pool["labels"], model.model.vision_tower
    feats = tower_features(model, pool["pixels"])
    slots = cfg.layout == "slots"
    tgt = (
        slot_word_targets(model, tok, pool["slots"], st.words, st.background_word)
        if slots
        else patch_word_targets(model, tok, labels, owner, st.words, st.background_word)
    )
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
    fit(
        list(proj.parameters()),
        st.steps,
        st.lr,
        st.batch_size,
        (lambda i: balanced(proj(feats[i]), tgt[i], shown[i]))
        if slots
        else (lambda i: _align_loss(proj(feats[i]), tgt[i])),
        "2/4 projector alignment",
    )
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
                return align + st.heads_weight * (
                    heads(hidden[-2][:, 1:], labels[i], owner[i])[0] + slot_heads(tokens, pool["slots"][i])[0]
                )
            return align + st.heads_weight * heads(tokens, labels[i], owner[i])[0]

        fit(
            list(proj.parameters()) + list(tower.parameters()) + [p for m in extra for p in m.parameters()],
            st.tower_steps,
            st.tower_lr,
            st.tower_batch_size,
            joint_loss,
            "2/4 tower + projector alignment",
        )
        tower.requires_grad_(False)
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, work / "tower.safetensors")
        feats = tower_features(model, pool["pixels"][:n_val])
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, work / "projector.safetensors")
    with torch.no_grad():
        val = _align_loss(proj(feats[:n_val]), tgt[:n_val]).item()
        words = (
            slot_word_readout(model, tok, proj(feats[:n_val]), pool["slots"][:n_val], st.words, st.background_word)
            if slots
            else word_readout(model, tok, proj(feats[:n_val]), labels[:n_val], owner[:n_val], st.words)
        )
    return _finish(
        cfg.work,
        "align",
        {
            "steps": st.steps,
            "tower_steps": st.tower_steps,
            "val_loss": val,
            "held_out_word_accuracy": words,
            "seconds": time.time() - t0,
        },
    )


def _align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine to the target word plus a relative norm term, over every patch."""
    cos = F.cosine_similarity(pred, target, dim=-1)
    rel = (pred.norm(dim=-1) - target.norm(dim=-1)) / target.norm(dim=-1)
    return (1 - cos).mean() + 0.1 * (rel**2).mean()


@torch.no_grad()
def word_readout(
    model,
    tokenizer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    owner: torch.Tensor,
    words: tuple[str, ...] = ("category",),
) -> dict[str, float]:
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
