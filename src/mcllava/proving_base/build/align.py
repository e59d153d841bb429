"""Stage 2, align: fit LLaVA's projector (then tower and projector together) so that image tokens read as words."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...errors import McLlavaError
from ...tokens import word_embedding_norm
from ...world.scenes import SETTINGS
from ..data import LABEL_TRAITS, LABEL_VALUES, N_SLOTS, OPTIONAL_TRAITS, PATCH_TRAITS, full_labels, patch_labels
from .common import _done, _finish, _log, _save_ckpt, _start, normalise, tower_features
from .config import SLOT_WORDS, BuildConfig
from .vision import SlotHeads, character_heads

# Each patch is aligned to ONE word embedding: an owned patch to its owner's trait word (`AlignStage.words`,
# cycled over the grid), a background patch to one fixed word at half a word's norm. The language model reads
# exact single words within a few LoRA steps, blends and mixtures far more slowly (docs/proving_base.md).
BACKGROUND_NORM = 0.5
SETTING_BACKGROUND = "setting"  # `AlignStage.background_word`: each scene's own setting word
MISSING_WORDS = {"accessory_color": "none", "held": "nothing"}  # the word of an optional trait's missing value


def patch_word_trait(grid: int, n_words: int, stride: int = 1) -> torch.Tensor:
    """[grid*grid] index into the align words of the trait each patch position shows ((stride*row + col) % n)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return ((stride * r + c) % n_words).reshape(-1)


def word_vectors(model, tokenizer, words: list[str]) -> torch.Tensor:
    """[len(words), D]: each word's embedding (mean over its tokens, with a leading space), at a word's norm."""
    emb = model.get_input_embeddings().weight.detach().float()
    norm = word_embedding_norm(model, len(tokenizer))
    vecs = [emb[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0) for w in words]
    return torch.stack([v / v.norm() * norm for v in vecs])


def trait_words(trait: str) -> list[str]:
    """The word of each class of a trait ("plush toy" -> "toy", "living room" -> "room"; an optional trait's
    missing value last: "none", "nothing")."""
    values = SETTINGS if trait == "setting" else LABEL_VALUES[trait]
    return [v.split()[-1] for v in values] + ([MISSING_WORDS[trait]] if trait in OPTIONAL_TRAITS else [])


def trait_word_vectors(model, tokenizer, trait: str) -> torch.Tensor:
    """[n_classes, D]: the word of each class of a trait (`trait_words`), or of each setting."""
    return word_vectors(model, tokenizer, trait_words(trait))


def _word_patches(labels: torch.Tensor, owner: torch.Tensor, words: tuple[str, ...], stride: int = 1):
    """Per align word and trait in it: (trait, bool [n, P] owned patches that show it, their owners' values).

    labels' columns are `LABEL_TRAITS` (or its first ones). A word "category+color" is a superposition: the
    same patches yield once per trait.
    """
    which = patch_word_trait(int(round(owner.shape[1] ** 0.5)), len(words), stride)
    per_patch = patch_labels(labels, owner)  # [n, P, T]
    for j, word in enumerate(words):
        m = (owner >= 0) & (which[None] == j)
        for trait in word.split("+"):
            yield trait, m, per_patch[..., LABEL_TRAITS.index(trait)][m]


def patch_word_targets(
    model,
    tokenizer,
    labels: torch.Tensor,
    owner: torch.Tensor,
    words: tuple[str, ...] = ("category",),
    background: str = "grass",
    setting: torch.Tensor | None = None,
    stride: int = 1,
) -> torch.Tensor:
    """[n, P, D] align targets: each owned patch's trait word, each background patch the background word (scaled).

    labels: [n, MAX_ACTORS, T] per-character values of the first T of `LABEL_TRAITS`; owner: [n, P] (-1 =
    background). A superposed word ("category+color") is the sum of its traits' words, rescaled to a word's norm.
    background "setting": each scene's setting word (`setting`: [n] indices into SETTINGS).
    """
    norm = word_embedding_norm(model, len(tokenizer))
    if background == SETTING_BACKGROUND:
        if setting is None:
            raise McLlavaError("background 'setting' needs each scene's setting: render the scene pool again")
        out = (trait_word_vectors(model, tokenizer, "setting")[setting] * BACKGROUND_NORM)[:, None]
        out = out.expand(-1, owner.shape[1], -1).clone()
    else:
        bg = word_vectors(model, tokenizer, [background])[0] * BACKGROUND_NORM
        out = bg.expand(*owner.shape, -1).clone()
    owned = torch.zeros_like(out)
    for trait, m, values in _word_patches(labels, owner, words, stride):
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
    owner, labels, tower = pool["owner"], full_labels(pool), model.model.vision_tower
    setting = pool.get("setting")
    feats = tower_features(model, pool["pixels"])
    slots = cfg.layout == "slots"
    tgt = (
        slot_word_targets(model, tok, pool["slots"], st.words, st.background_word)
        if slots
        else patch_word_targets(model, tok, labels, owner, st.words, st.background_word, setting, st.stride)
    )
    proj = model.model.multi_modal_projector
    n_val = max(64, len(owner) // 20)
    t0 = time.time()

    def held_out(n: int = min(n_val, 256)) -> float:  # fresh tower features only while the tower is training
        tuning = next(tower.parameters()).requires_grad
        with torch.no_grad():
            x = tower_features(model, pool["pixels"][:n]) if tuning else feats[:n]
            return _align_loss(proj(x), tgt[:n]).item()

    def fit(modules: dict, steps: int, lr: float, batch: int, loss_fn: Callable, desc: str, part: int) -> None:
        """Train `modules` together; every `CHECKPOINT_EVERY` steps their states go to `align/part<part>.pt`,
        from which an interrupted build continues (a finished part is only loaded back)."""
        params = [q for m in modules.values() for q in m.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        ckpt, start = work / f"part{part}.pt", 0
        if ckpt.exists():
            saved = torch.load(ckpt, weights_only=False)
            for name, m in modules.items():
                m.load_state_dict(saved["modules"][name])
            opt.load_state_dict(saved["opt"]), sched.load_state_dict(saved["sched"])
            start = saved["step"]
        for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not cfg.progress):
            gen = torch.Generator().manual_seed(cfg.seed + 100_000 * part + step)  # a step's batch: the same if resumed
            loss = loss_fn(torch.randint(n_val, len(owner), (batch,), generator=gen))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0:
                _log(cfg.work, "align", {"part": desc, "step": step + 1, "loss": loss.item(), "val_loss": held_out()})
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
                states = {name: m.state_dict() for name, m in modules.items()}
                _save_ckpt(
                    ckpt, {"modules": states, "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1}
                )

    # what each token shows: an owned patch, or a token of an occupied slot; the rest shows the background word
    shown = (pool["slots"][..., 0] != -100).repeat_interleave(len(st.words), dim=1) if slots else owner >= 0

    def balanced(pred: torch.Tensor, target: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Shown tokens weigh as much as the background ones (most tokens of a slots grid are empty slots)."""
        return sum(_align_loss(pred[k], target[k]) for k in (m, ~m) if k.any())

    # (1) the projector alone, on cached tower features
    proj.requires_grad_(True)
    fit(
        {"projector": proj},
        st.steps,
        st.lr,
        st.batch_size,
        (lambda i: balanced(proj(feats[i]), tgt[i], shown[i]))
        if slots
        else (lambda i: _align_loss(proj(feats[i]), tgt[i])),
        "2/4 projector alignment",
        1,
    )
    # (2) optionally the tower too, end to end from pixels: a frozen tower's patch features hardly tell a patch's
    # grid position, so a projector alone blends the words cycled over the grid (docs/proving_base.md), and a
    # projector alone on the slots tower read the words it shows less well than the tower's own heads. The vision
    # stage's heads stay on as a second loss so that the tower keeps every trait.
    if st.tower_steps > 0:
        vis = torch.load(cfg.work / "vision" / "ckpt.pt", weights_only=False)
        heads = character_heads(cfg)
        heads.load_state_dict(vis["heads"])
        head_labels, held_patch = heads.labels(pool), pool.get("held_patch")
        modules = {"projector": proj, "tower": tower, "heads": heads}
        if slots:
            slot_heads = SlotHeads(cfg.vision.hidden, st.words)
            slot_heads.load_state_dict(vis["slot_heads"])
            modules["slot_heads"] = slot_heads
        tower.requires_grad_(True)

        def joint_loss(i: torch.Tensor) -> torch.Tensor:
            hidden = tower(pixel_values=normalise(pool["pixels"][i]), output_hidden_states=True).hidden_states
            tokens = hidden[-1][:, 1:]
            align = balanced(proj(tokens), tgt[i], shown[i])
            if slots:  # as in the vision stage: per-character heads below the last layer, slot heads on it
                return align + st.heads_weight * (
                    heads(hidden[-2][:, 1:], head_labels[i], owner[i])[0] + slot_heads(tokens, pool["slots"][i])[0]
                )
            scene = None if heads.setting is None else setting[i]
            shows = None if held_patch is None else held_patch[i]
            return align + st.heads_weight * heads(tokens, head_labels[i], owner[i], scene, shows)[0]

        fit(modules, st.tower_steps, st.tower_lr, st.tower_batch_size, joint_loss, "2/4 tower + projector alignment", 2)
        tower.requires_grad_(False)
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, work / "tower.safetensors")
        feats = tower_features(model, pool["pixels"][:n_val])
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, work / "projector.safetensors")
    with torch.no_grad():
        val = _align_loss(proj(feats[:n_val]), tgt[:n_val]).item()
        words = (
            slot_word_readout(model, tok, proj(feats[:n_val]), pool["slots"][:n_val], st.words, st.background_word)
            if slots
            else word_readout(
                model,
                tok,
                proj(feats[:n_val]),
                labels[:n_val],
                owner[:n_val],
                st.words,
                st.stride,
                None if st.background_word != SETTING_BACKGROUND else setting[:n_val],
            )
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


CHECKPOINT_EVERY = 50  # align steps between checkpoints


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
    stride: int = 1,
    setting: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per align trait: share of its patches whose token is closest (cosine) to the right word.

    Cycled words compete against every word of every cycled trait (a blend of the category and colour words
    is wrong on both); a superposed word's traits are each read among their own words. With `setting` ([n]
    indices into SETTINGS), also the share of background patches closest to their scene's setting word among
    all of these words and the setting words.
    """
    traits = [t for w in words for t in w.split("+")] + (["setting"] if setting is not None else [])
    # one row per distinct word: traits share words ("red" is a colour and an accessory colour, "round" ears and
    # a head), and a token is read as a word, whichever trait put it there
    union_words = list(dict.fromkeys(w for t in traits for w in trait_words(t)))
    union = F.normalize(word_vectors(model, tokenizer, union_words), dim=-1)
    index = {t: torch.tensor([union_words.index(w) for w in trait_words(t)]) for t in traits}
    superposed = {t for w in words if "+" in w for t in w.split("+")}
    found = list(_word_patches(labels, owner, words, stride))
    if setting is not None:
        bg = owner < 0
        found.append(("setting", bg, setting[:, None].expand_as(owner)[bg]))
    out = {}
    for trait, m, values in found:
        rows = index[trait] if trait in superposed else torch.arange(len(union_words))
        guess = rows[(F.normalize(tokens[m].float(), dim=-1) @ union[rows].T).argmax(-1)]
        out[trait] = round(float((guess == index[trait][values]).float().mean()), 3)
    return out
