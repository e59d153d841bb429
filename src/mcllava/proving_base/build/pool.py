"""Pre-encoded sample pools of the LM stage: tokenised prompts, frozen tower features, visual definitions."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from ...kmeans_init import covered_patches, rescale
from ...training_data import collate
from ..data import N_SLOTS, PATCH_TRAITS, Curriculum, to_pixels
from ..tasks import lm_sample
from .align import slot_word_targets
from .common import tower_features
from .config import BuildConfig


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


def encode_pool(
    backbone, model, samples: list[dict], size: int, rows: int = 4, words: tuple[str, ...] | None = None
) -> EncodedPool:
    """Tokenise and pre-encode samples; with `words` (the "slots" layout) also their exact image rows (`oracle`)."""
    enc = [
        backbone.encode(
            backbone.format_prompt(s["question"], s.get("system"), image=s["image"] is not None),
            s["answer"],
            definition_rows=rows,
        )
        for s in samples
    ]
    batch = collate(enc, [None] * len(enc), backbone.tokenizer.pad_token_id)
    pixels = torch.from_numpy(np.stack([to_pixels(s["image"], size) for s in samples]))
    pool = EncodedPool(
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        tower_features(model, pixels),
        torch.tensor([s["image"] is not None for s in samples]),
        [s["kind"] for s in samples],
        [s["answer"] for s in samples],
        changed=[tuple(s.get("changed", ())) for s in samples],
    )
    if words is not None:
        empty = np.full((N_SLOTS, len(PATCH_TRAITS)), -100)  # text-only samples: rows never used
        slots = torch.from_numpy(np.stack([s.get("slots", empty) for s in samples]))
        pool.oracle = slot_word_targets(model, backbone.tokenizer, slots.to(backbone.device), words).cpu()
    refs = [s.get("refs") or [] for s in samples]
    r_max = max(len(r) for r in refs)
    if r_max:
        n, grid = len(samples), int(round(pool.features.shape[1] ** 0.5))
        flat = [(i, j, img, cov) for i, r in enumerate(refs) for j, (img, cov) in enumerate(r)]
        feats = tower_features(model, torch.from_numpy(np.stack([to_pixels(img, size) for _, _, img, _ in flat])))
        pool.ref_features = torch.zeros(n, r_max, *pool.features.shape[1:])
        pool.ref_weights = torch.zeros(n, r_max, rows, grid * grid)
        coverage = backbone.mask_coverage(
            [mask for *_, mask in flat], [img for _, _, img, _ in flat]
        )  # through the layout
        for (i, j, _, _), f, cov in zip(flat, feats, coverage):
            pool.ref_features[i, j] = f
            pool.ref_weights[i, j] = cluster_weights(f, cov.numpy(), rows, seed=i)
        pool.n_refs = torch.tensor([len(r) for r in refs])
    return pool


def _draw(args: tuple) -> dict:
    return lm_sample(*args)


def make_pool(
    cfg: BuildConfig,
    backbone,
    model,
    cur: Curriculum,
    start: int,
    n: int,
    seed: int,
    half: str = "base",
    desc: str = "pool",
) -> EncodedPool:
    jobs = [(seed, start + i, cur, cfg.vision.image_size, half) for i in range(n)]
    bar = dict(desc=desc, total=n, disable=not cfg.progress, mininterval=5)
    if cfg.lm.workers > 1:  # each sample depends only on its index: the same pool, drawn in parallel
        with ProcessPoolExecutor(cfg.lm.workers) as ex:
            samples = list(tqdm(ex.map(_draw, jobs, chunksize=64), **bar))
    else:
        samples = [_draw(j) for j in tqdm(jobs, **bar)]
    return encode_pool(
        backbone,
        model,
        samples,
        cfg.vision.image_size,
        cfg.lm.definition_rows,
        cfg.align.words if cfg.layout == "slots" else None,
    )


def sample_features(
    backbone, pool: EncodedPool, idx: torch.Tensor, norm: float, oracle: bool = False
) -> torch.Tensor | None:
    """Rows for every placeholder of the samples `idx`, in sequence order: definition slots, then the image
    (the projected tower tokens, or with `oracle` the pool's exact align targets)."""
    proj = backbone.model.model.multi_modal_projector
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


def lm_loss(backbone, pool: EncodedPool, idx: torch.Tensor, norm: float, oracle: bool = False) -> torch.Tensor:
    width = int(pool.attention_mask[idx].sum(1).max())
    ids, mask, labels = (t[idx, :width].to(backbone.device) for t in (pool.input_ids, pool.attention_mask, pool.labels))
    return backbone.answer_loss(ids, mask, labels, sample_features(backbone, pool, idx, norm, oracle))
