"""k-means initialisation of concept rows from the concept's own visual tokens.

The projected visual tokens live in the language model's input space, so clustering the tokens that fall on
the concept gives `k` vectors that already "look like" the concept to the language model. Rescaled to the
norm of ordinary word embeddings they start training close to where they must end, which is what lets
MC-LLaVA converge faster and need fewer negatives than random initialisation.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans


def masked_tokens(patches: torch.Tensor, coverage: torch.Tensor, min_coverage: float = 0.5) -> torch.Tensor:
    """Visual tokens of the patches covered by the mask ([B, P, D], [B, P] -> [n, D]).

    Patches at least `min_coverage` inside the mask are kept; an image whose mask covers no patch that much
    contributes its single best-covered patch, so a tiny concept still has a say.
    """
    keep = [feats[covered_patches(cov, min_coverage).to(feats.device)] for feats, cov in zip(patches, coverage)]
    return torch.cat(keep).float().cpu()


def covered_patches(coverage: torch.Tensor, min_coverage: float = 0.5) -> torch.Tensor:
    """Bool [P]: patches at least `min_coverage` inside the mask, or the single best-covered one if none is."""
    sel = coverage >= min_coverage
    return sel if sel.any() else coverage == coverage.max()


def rescale(rows: torch.Tensor, norm: float) -> torch.Tensor:
    """Give every row the L2 norm `norm` (the mean norm of word embeddings)."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8) * norm


def kmeans_rows(tokens: torch.Tensor, k: int, norm: float, seed: int = 0) -> torch.Tensor:
    """k-means of the concept's visual tokens -> [k+1, D] rows: the mean of the centres, then the k centres.

    Every row is rescaled to `norm`, the identifier included (a plain mean of the centres would be shorter than
    any word embedding). Deterministic for a seed. With fewer tokens than `k`, tokens are repeated with a little
    seeded noise so that k distinct centres still exist.
    """
    x = tokens.float().numpy()
    rng = np.random.default_rng(seed)
    if len(x) < k:
        reps = x[rng.integers(0, len(x), size=k - len(x))]
        x = np.concatenate([x, reps + 1e-3 * rng.standard_normal(reps.shape).astype(x.dtype) * np.abs(x).mean()])
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    centres = torch.from_numpy(km.cluster_centers_).float()
    # Order the centres by cluster size so that <c_1> is the concept's dominant look (stable across runs).
    sizes = np.bincount(km.labels_, minlength=k)
    centres = centres[torch.from_numpy(np.argsort(-sizes, kind="stable"))]
    rows = torch.cat([centres.mean(0, keepdim=True), centres])
    return rescale(rows, norm)


def random_rows(k: int, dim: int, norm: float, seed: int = 0) -> torch.Tensor:
    """The ablation alternative: random directions at the word-embedding norm ([k+1, D]), seeded."""
    g = torch.Generator().manual_seed(seed)
    return rescale(torch.randn(k + 1, dim, generator=g), norm)
