"""The personalisation loop: all concepts at once, only their token rows train.

Read top to bottom: load the base, add concept tokens, embed every training image once (and its mirror),
initialise the rows with k-means, then loop over balanced epochs with AdamW, checkpointing after each epoch
so that `resume=True` continues an interrupted run to the same result. `recipe="paper"` reproduces the
MC-LLaVA code's choices (batch 1, full embedding/head matrices in the optimizer with the other rows restored
after each step, vision tower run at every step) so that speed and memory can be compared on the same data.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .backbone import Backbone
from .bank import ConceptBank, config_hash
from .captions import distil_captions
from .checkpoint import (
    checkpoint_dir,
    fault_point,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from .concepts import ConceptSet, ImageLimits, load_image, load_mask, validate_concept_id
from .errors import McLlavaError
from .extend import check_extension, extended_bank, old_catalog
from .kmeans_init import kmeans_rows, masked_tokens, random_rows
from .open_answers import distil_answers
from .tokens import (
    ConceptTokens,
    add_concept_tokens,
    head_is_tied,
    make_trainable,
    trained_rows,
    word_embedding_norm,
    write_rows,
)
from .training_data import (
    PROBE_QUESTION,
    CatalogEntry,
    ConceptFacts,
    DataOptions,
    ImageRef,
    Sample,
    build_epoch,
    collate,
)


@dataclass
class TrainConfig:
    """Everything that decides a personalisation run (saved in the bank's manifest as its recipe)."""

    k: int = 16
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 8
    init: Literal["kmeans", "random"] = "kmeans"
    recipe: Literal["fast", "paper"] = "fast"
    seed: int = 0
    holdout: int = 1  # training images per concept kept aside for the per-epoch recognition check (if >= 3)
    data: DataOptions = field(default_factory=DataOptions)
    introduce: Literal["all", "relevant"] = "all"  # system text: every concept, or those a sample names or shows
    cpu_bf16: bool = (
        False  # bf16 autocast for fp32 models on CPU: several times faster where the CPU has AMX/AVX512-BF16
    )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    bank: ConceptBank
    history: list[dict]  # one entry per epoch: loss, probe accuracy, seconds


# ------------------------------------------------------------------------------------------------ images
class ImageStore:
    """The training images by catalogue key, loaded once; visual tokens cached per (key, flip) for the fast recipe."""

    def __init__(self, backbone: Backbone, entries: list[CatalogEntry], limits: ImageLimits):
        self.backbone = backbone
        self.entries = {e.key: e for e in entries}
        self.images: dict[str, Image.Image] = {}
        self.masks: dict[str, object] = {}
        for e in entries:
            image = load_image(Path(e.path), limits)
            self.images[e.key] = image
            self.masks[e.key] = load_mask(Path(e.mask_path), image.size) if e.mask_path else None
        self.cache: dict[ImageRef, torch.Tensor] = {}

    def image(self, ref: ImageRef) -> Image.Image:
        im = self.images[ref.key]
        return ImageOps.mirror(im) if ref.flip else im

    def fill_cache(self, refs: list[ImageRef], progress: bool) -> None:
        """Run the frozen vision tower and projector once per image (and mirror) used in training."""
        todo = [r for r in dict.fromkeys(refs) if r not in self.cache]
        bs = 16
        for start in tqdm(range(0, len(todo), bs), desc="embedding images", disable=not progress, leave=False):
            chunk = todo[start : start + bs]
            feats = self.backbone.visual_tokens([self.image(r) for r in chunk]).features
            for r, f in zip(chunk, feats):
                self.cache[r] = f

    def features(self, refs: list[ImageRef], cached: bool) -> torch.Tensor:
        if cached:
            return torch.stack([self.cache[r] for r in refs])
        return self.backbone.visual_tokens([self.image(r) for r in refs]).features


def build_catalog(
    concepts: ConceptSet, negatives: Path | None, holdout: int
) -> tuple[list[CatalogEntry], list[CatalogEntry]]:
    """Training and probe entries: each concept's photos (a few held out), group photos, generic negatives."""
    train, probe = [], []
    for c in concepts:
        n_hold = holdout if len(c.images) >= 3 else 0
        for i, im in enumerate(c.images):
            entry = CatalogEntry(
                f"{c.id}/{i}", str(im.path), str(im.mask_path) if im.mask_path else None, frozenset([c.id])
            )
            (probe if i >= len(c.images) - n_hold else train).append(entry)
    for j, m in enumerate(concepts.multi):
        train.append(CatalogEntry(f"_multi/{j}", str(m.path), None, frozenset(m.present)))
    if negatives is not None:
        files = sorted(
            p for p in Path(negatives).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        )
        if not files:
            raise McLlavaError(f"negatives folder {negatives} has no images")
        train += [CatalogEntry(f"_neg/{j}", str(p), None, frozenset()) for j, p in enumerate(files)]
    return train, probe


def hard_negative_keys(
    backbone: Backbone,
    store: ImageStore,
    entries: list[CatalogEntry],
    refs: dict[str, torch.Tensor],
    n: int,
    cache: bool,
) -> dict[str, tuple[str, ...]]:
    """Per concept, the `n` generic negatives most like it: an image scores the mean cosine of its best k tokens
    to the concept's k-means references (each token's best reference), so a photo whose character shares many
    of the concept's traits ranks first, as a look-alike would."""
    keys = [e.key for e in entries if e.key.startswith("_neg/")]
    if n <= 0 or not keys:
        return {}
    vt = backbone.visual_tokens([store.images[k] for k in keys])
    if cache:  # the same tokens the fast recipe trains on
        store.cache.update({ImageRef(k): f for k, f in zip(keys, vt.features)})
    patches = torch.nn.functional.normalize(vt.patches.float(), dim=-1)
    out = {}
    for cid, r in refs.items():
        cos = (patches @ torch.nn.functional.normalize(r.float(), dim=-1).T).max(-1).values  # [images, tokens]
        score = cos.topk(min(len(r), cos.shape[1]), dim=1).values.mean(1)
        out[cid] = tuple(keys[i] for i in score.argsort(descending=True)[:n].tolist())
    return out


# ------------------------------------------------------------------------------------------------ probe
@torch.no_grad()
def yes_no_margin(backbone: Backbone, system: str, question: str, features: torch.Tensor) -> float:
    """logit(Yes) - logit(No) for the first answer token: the model's recognition decision, without generating."""
    enc = backbone.encode(backbone.format_prompt(question, system=system))
    ids = torch.tensor([enc.input_ids], device=backbone.device)
    hidden = backbone.hidden_states(backbone.embed(ids, features[None]), torch.ones_like(ids))[:, -1]
    return backbone.yes_no_margin(hidden)[0].item()


def probe_accuracy(
    backbone: Backbone,
    tokens: ConceptTokens,
    store: ImageStore,
    probe: list[CatalogEntry],
    introduce: str = "all",
    asked: list[str] | None = None,
) -> dict | None:
    """Recognition weighted accuracy on held-out training images, every concept (or those `asked`) asked about every image."""
    if not probe:
        return None
    refs = [ImageRef(e.key) for e in probe]
    store.fill_cache(refs, progress=False)  # the frozen tower sees each held-out image once, not once per epoch
    pos, neg = [], []
    for e, ref in zip(probe, refs):
        feats = store.cache[ref]
        for cid in asked or tokens.concept_ids:
            question = PROBE_QUESTION.format(c=tokens.token(cid))
            system = tokens.system_text(tokens.relevant(question, e.present) if introduce == "relevant" else None)
            yes = yes_no_margin(backbone, system, question, feats) > 0
            (pos if cid in e.present else neg).append(yes if cid in e.present else not yes)
    pr = sum(pos) / max(len(pos), 1)
    nr = sum(neg) / max(len(neg), 1)
    return {"positive_recall": pr, "negative_recall": nr, "weighted_accuracy": (pr + nr) / 2}


# ------------------------------------------------------------------------------------------------ main loop
def _written_by_the_base(
    backbone: Backbone,
    concepts: ConceptSet,
    store: ImageStore,
    entries: list[CatalogEntry],
    config: TrainConfig,
    found: Path | None,
    progress: bool,
    log,
) -> tuple[dict[str, str], dict[str, list[list[str]]]]:
    """Caption answers for `DataOptions.captions` and open answers for `DataOptions.open_answers`, written by the
    base from the concepts' descriptions before concept tokens exist. Both are saved in every checkpoint, so a run
    resumed from `found` trains on the same ones without writing them again."""
    saved = json.loads((found / "state.json").read_text()) if found is not None else {}
    descriptions = {c.id: c.description for c in concepts}

    def features(chosen: list[CatalogEntry]) -> torch.Tensor:
        return store.features([ImageRef(e.key) for e in chosen], cached=False)

    captions, answers = {}, {}
    if config.data.captions:
        captions = saved.get("captions")
        if captions is None:
            captions = distil_captions(backbone, entries, descriptions, features, progress)
            n_photos = sum(1 for e in entries if e.present)
            log(
                f"captions: the base described {len(captions)} of {n_photos} concept photos naming exactly the concepts shown"
            )
    if config.data.open_answers:
        answers = saved.get("answers")
        if answers is None:
            questions = config.data.open_questions
            answers = distil_answers(backbone, entries, descriptions, features, questions, progress)
            asked = sum(len(e.present) for e in entries if e.present) * len(questions)
            log(
                f"open answers: the base answered {sum(map(len, answers.values()))} of {asked} questions about the photos"
            )
    return captions, answers


def personalize(
    concepts: ConceptSet,
    base: str | Backbone,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    negatives: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    limits: ImageLimits = ImageLimits(),
    log=print,
    on_epoch: Callable[[dict, ConceptBank], None] | None = None,
    extend: ConceptBank | None = None,
    extend_concepts: ConceptSet | None = None,
) -> TrainResult:
    """Train one bank for all concepts of `concepts` on a frozen base model and save it to `out`.

    `on_epoch(entry, bank)`, if given, is called after every epoch's checkpoint with the epoch's history entry
    and an unsaved bank of the rows so far (benchmarks evaluate it on held-out questions, for learning curves).
    With `extend` (a trained bank on the same base) and `extend_concepts` (its concept folder), only the new
    concepts' rows train, the bank's concepts serve as negatives, and `out` gets the bank's concepts and the new
    ones, the bank's rows unchanged (see `extend.py`).
    """
    out = Path(out)
    torch.manual_seed(config.seed)
    backbone = base if isinstance(base, Backbone) else Backbone.load(base)
    model, tokenizer = backbone.model, backbone.tokenizer
    base_hash = config_hash(model.config)  # before the vocabulary grows
    n_ordinary = len(tokenizer)
    for c in concepts:
        validate_concept_id(c.id, tokenizer, c.root)

    frozen: list[str] = []
    train_entries, probe = build_catalog(concepts, Path(negatives) if negatives else None, config.holdout)
    if extend is not None:
        old_set = check_extension(extend, concepts, extend_concepts, base_hash, n_ordinary, config.k, config.introduce)
        frozen = list(extend.concept_ids)
        train_entries += old_catalog(old_set)
    store = ImageStore(backbone, train_entries + probe, limits)
    ckpt = checkpoint_dir(out)
    found = latest_checkpoint(ckpt) if resume else None
    new_entries = [e for e in train_entries if not e.present & set(frozen)]  # the bank's photos need no captions
    captions, answers = _written_by_the_base(backbone, concepts, store, new_entries, config, found, progress, log)
    tokens = add_concept_tokens(model, tokenizer, frozen + concepts.ids, config.k)  # the bank's order, then the new
    trained = tokens.subset(concepts.ids)  # the rows that train
    if extend is not None:
        write_rows(model, tokens.subset(frozen), extend.input_rows, extend.head_rows)

    # k-means (or random) initialisation of every concept's rows.
    norm = word_embedding_norm(model, n_ordinary)
    init_rows, refs = [], {}
    for i, c in enumerate(concepts):
        keys = [e.key for e in train_entries if e.key.startswith(f"{c.id}/")]
        vt = backbone.visual_tokens([store.images[k] for k in keys], [store.masks[k] for k in keys])
        if config.recipe == "fast":  # the same tokens the training cache needs: keep them, don't embed twice
            store.cache.update({ImageRef(k): f for k, f in zip(keys, vt.features)})
        feats = masked_tokens(vt.patches, vt.coverage)
        refs[c.id] = kmeans_rows(feats, min(config.k, len(feats)), 1.0, seed=config.seed)[1:]  # locator references
        if config.init == "kmeans":
            init_rows.append(kmeans_rows(feats, config.k, norm, seed=config.seed + i))
        else:
            init_rows.append(random_rows(config.k, backbone.hidden_size, norm, seed=config.seed + i))
    write_rows(model, trained, torch.stack(init_rows))
    hard = hard_negative_keys(backbone, store, train_entries, refs, config.data.hard_negatives, config.recipe == "fast")

    # Trainable state: PEFT trainable-token rows (fast), or the full matrices (paper).
    tied = head_is_tied(model)
    if config.recipe == "fast":
        params = make_trainable(model, trained)
    else:
        params = list(dict.fromkeys([model.get_input_embeddings().weight, model.get_output_embeddings().weight]))
        for p in params:
            p.requires_grad_(True)
        index = torch.tensor(trained.all_ids, device=backbone.device)
        originals = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    facts = [ConceptFacts(c.id, c.description, c.facts, hard.get(c.id, ())) for c in concepts]
    present = {e.key: e.present for e in train_entries}

    def system_for(s: Sample) -> str:
        """Every concept's introduction, or (introduce="relevant") those the sample names or its photo shows."""
        if config.introduce == "all":
            return tokens.system_text()
        return tokens.system_text(tokens.relevant(s.question, present[s.image.key] if s.image is not None else ()))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    meta_key = {
        "config": config.to_dict(),
        "concepts": concepts.ids,
        "base": base_hash,
        **({"extends": frozen} if frozen else {}),
    }
    start_epoch, history = 0, []
    if found is not None:
        meta = load_checkpoint(found, params, optimizer)
        if {k: meta.get(k) for k in meta_key} != json.loads(json.dumps(meta_key)):
            raise McLlavaError(
                f"checkpoint {found} belongs to another run (different settings or concepts); remove it or drop --resume"
            )
        start_epoch, history = meta["epoch"], meta["history"]
        log(f"resuming from {found} after epoch {start_epoch}")

    def current_bank() -> ConceptBank:
        input_rows, head_rows = trained_rows(model, trained)
        bank = ConceptBank(
            base_model=backbone.name,
            base_config_hash=base_hash,
            tokenizer_len_before=n_ordinary,
            concept_ids=list(concepts.ids),
            k=config.k,
            hidden_size=backbone.hidden_size,
            tied_head=tied,
            input_rows=input_rows,
            head_rows=head_rows,
            locator_refs=refs,
            display={
                c.id: {"name": c.name, "category": c.category, "description": c.description, "facts": c.facts}
                for c in concepts
            },
            recipe=config.to_dict(),
            metrics={"history": list(history)},
        )
        return bank if extend is None else extended_bank(extend, bank)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        rng = random.Random(config.seed * 100_003 + epoch)
        samples = build_epoch(train_entries, facts, rng, config.data, captions, frozen, answers)
        if config.recipe == "fast":
            store.fill_cache([s.image for s in samples if s.image is not None], progress)
        bs = config.batch_size
        bar = tqdm(range(0, len(samples), bs), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        losses = []
        for start in bar:
            chunk = samples[start : start + bs]
            encoded = [
                backbone.encode(
                    backbone.format_prompt(s.question, system=system_for(s), image=s.image is not None), s.answer
                )
                for s in chunk
            ]
            batch = collate(encoded, [s.image for s in chunk], pad_id)
            refs_with_image = [s.image for s in chunk if s.image is not None]
            feats = store.features(refs_with_image, cached=config.recipe == "fast") if refs_with_image else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.cpu_bf16 and backbone.device.type == "cpu"):
                loss = backbone.answer_loss(
                    batch.input_ids.to(backbone.device),
                    batch.attention_mask.to(backbone.device),
                    batch.labels.to(backbone.device),
                    feats,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            fault_point(f"step:{epoch + 1}:{len(losses) + 1}")
            if config.recipe == "paper":  # only concept rows may change: put every other row back
                with torch.no_grad():
                    for p, orig in zip(params, originals):
                        keep = p[index].clone()
                        p.copy_(orig)
                        p[index] = keep
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        entry = {
            "epoch": epoch + 1,
            "loss": sum(losses) / max(len(losses), 1),
            "seconds": time.perf_counter() - t0,
            "steps": len(losses),
        }
        acc = probe_accuracy(backbone, tokens, store, probe, config.introduce, trained.concept_ids)
        if acc:
            entry["probe"] = acc
        history.append(entry)
        log(
            f"epoch {epoch + 1}: loss {entry['loss']:.4f}, {entry['seconds']:.1f}s"
            + (f", held-out recognition {acc['weighted_accuracy']:.3f}" if acc else "")
        )
        save_checkpoint(
            ckpt,
            params,
            optimizer,
            {**meta_key, "epoch": epoch + 1, "history": history, "captions": captions, "answers": answers},
        )
        if on_epoch is not None:
            on_epoch(entry, current_bank())

    bank = current_bank()
    bank.save(out)
    fault_point("bank:saved")
    remove_checkpoint(ckpt)
    return TrainResult(bank=bank, history=history)
