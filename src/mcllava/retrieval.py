"""The training-free arm: recognise concepts by visual similarity to their training photos, no new tokens.

What a user could pick instead of personalising (in the spirit of RAP and PeKit): a concept's reference is the
set of masked visual tokens of its training photos (the tokens the frozen vision tower and projector give, the
same ones k-means initialisation clusters); a query photo scores, per concept, its best-matching region (the
mean over a region's tokens of each token's best cosine to the references); the concept is said present when
the score reaches the concept's threshold. Thresholds come from training data only: each training photo scored
against the references of the *other* photos (leave one out) as positives, the other concepts' photos and the
generic negatives as negatives, the cut that best balances the two recalls. The test set is never looked at.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone
from .concepts import ConceptSet, load_image
from .datasets.records import concepts_in
from .errors import McLlavaError
from .kmeans_init import covered_patches
from .layout import SlotLayout

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ConceptReference:
    """One concept's masked training tokens (unit rows), which photo each came from, its region size, its cut."""

    tokens: torch.Tensor  # [n, D], L2-normalised
    photo: torch.Tensor  # [n] index of the training photo each token came from
    window: int  # region side in tokens (grid layouts)
    threshold: float = 0.0


def best_cosines(features: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """[P]: each token's best cosine to the reference rows (features [P, D] need not be normalised)."""
    return (F.normalize(features.float(), dim=-1) @ refs.T).max(dim=1).values


def region_score(token_scores: torch.Tensor, layout, window: int) -> float:
    """The best region's mean token score: slot rows for the proving ground's slot layout, else square windows."""
    gh, gw = layout.grid
    grid = token_scores.reshape(gh, gw)
    if isinstance(layout, SlotLayout):  # a row of tokens is one character
        return float(grid.mean(dim=1).max())
    k = max(1, min(window, gh, gw))
    return float(F.avg_pool2d(grid[None, None], k, stride=1).max())


def best_cut(pos: list[float], neg: list[float]) -> float:
    """The threshold (midway between two scores) that maximises the mean of positive and negative recall."""
    if not pos:
        raise McLlavaError("a concept without training photos has no reference")
    if not neg:
        return min(pos)
    values = sorted(set(pos) | set(neg))
    cuts = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]

    def balanced(t: float) -> float:
        return (sum(p >= t for p in pos) / len(pos) + sum(n < t for n in neg) / len(neg)) / 2

    return max(cuts, key=lambda t: (balanced(t), -abs(t - (min(pos) + max(neg)) / 2)))


@dataclass
class RetrievalArm:
    """Answers recognition questions ("Is <c> in this photo?", "Are <a> and <b> both ...?") by retrieval.

    Follows the evaluation runner's `Answerer` protocol; `seconds_per_photo` is its cost on the photos it saw.
    """

    backbone: Backbone
    references: dict[str, ConceptReference]
    names: dict[str, str]
    fit_seconds: float = 0.0
    _scores: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    _photo_seconds: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def fit(
        cls, backbone: Backbone, concepts: ConceptSet, negatives: str | Path | None = None, min_coverage: float = 0.5
    ) -> RetrievalArm:
        """References and thresholds from the concept folder (and optional generic negatives) alone."""
        t0 = time.perf_counter()
        layout = backbone.layout
        photos: dict[str, list[torch.Tensor]] = {}
        refs: dict[str, ConceptReference] = {}
        for c in concepts:
            loaded = [im.load() for im in c.images]
            vt = backbone.visual_tokens([im for im, _ in loaded], [m for _, m in loaded])
            patches = vt.patches.float().cpu()
            photos[c.id] = list(patches)
            rows, owner, areas = [], [], []
            for i, (feats, cov) in enumerate(zip(patches, vt.coverage)):
                keep = covered_patches(cov, min_coverage)
                rows.append(feats[keep])
                owner += [i] * int(keep.sum())
                areas.append(int(keep.sum()))
            window = max(1, round(math.sqrt(sorted(areas)[len(areas) // 2])))
            refs[c.id] = ConceptReference(F.normalize(torch.cat(rows), dim=-1), torch.tensor(owner), window)
        extra: list[torch.Tensor] = []
        if negatives is not None:
            files = sorted(p for p in Path(negatives).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                extra = list(backbone.visual_tokens([load_image(p) for p in files]).patches.float().cpu())
        group_photos = [
            (m.present, backbone.visual_tokens([load_image(m.path)]).patches[0].float().cpu()) for m in concepts.multi
        ]
        for cid, ref in refs.items():
            pos = []
            for i, feats in enumerate(photos[cid]):  # leave the photo's own tokens out
                others = ref.tokens[ref.photo != i]
                if len(others):
                    pos.append(region_score(best_cosines(feats, others), layout, ref.window))
            pos += [
                region_score(best_cosines(f, ref.tokens), layout, ref.window)
                for present, f in group_photos
                if cid in present
            ]
            neg = [
                region_score(best_cosines(f, ref.tokens), layout, ref.window)
                for o, fs in photos.items()
                if o != cid
                for f in fs
            ]
            neg += [region_score(best_cosines(f, ref.tokens), layout, ref.window) for f in extra]
            neg += [
                region_score(best_cosines(f, ref.tokens), layout, ref.window)
                for present, f in group_photos
                if cid not in present
            ]
            ref.threshold = best_cut(pos or [1.0], neg)
        names = {c.id: c.name for c in concepts}
        return cls(backbone, refs, names, fit_seconds=time.perf_counter() - t0)

    def scores(self, image: Image.Image) -> dict[str, float]:
        """Each concept's best-region score on a photo (computed once per distinct photo)."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + repr(image.size)
        if key not in self._scores:
            t0 = time.perf_counter()
            feats = self.backbone.visual_tokens([image.convert("RGB")]).patches[0].float().cpu()
            self._scores[key] = {
                cid: region_score(best_cosines(feats, r.tokens), self.backbone.layout, r.window)
                for cid, r in self.references.items()
            }
            self._photo_seconds.append(time.perf_counter() - t0)
        return self._scores[key]

    def present(self, image: Image.Image) -> dict[str, bool]:
        return {cid: s >= self.references[cid].threshold for cid, s in self.scores(image).items()}

    def answer(self, image: Image.Image | None, question: str) -> str:
        """ "Yes" when every concept the question names is found in the photo, else "No"."""
        asked = concepts_in(question)
        if image is None or not asked:
            raise McLlavaError("the retrieval arm answers recognition questions about a photo that name concepts")
        found = self.present(image)
        return "Yes" if all(found.get(c, False) for c in asked) else "No"

    def locate(self, image: Image.Image) -> dict[str, tuple[float, float] | None]:
        return {}

    @property
    def seconds_per_photo(self) -> float | None:
        return sum(self._photo_seconds) / len(self._photo_seconds) if self._photo_seconds else None

    def summary(self) -> dict:
        """Cost and calibration, for reports: seconds per photo, fitting time, each concept's threshold."""
        return {
            "seconds_per_photo": self.seconds_per_photo,
            "photos": len(self._photo_seconds),
            "fit_seconds": self.fit_seconds,
            "thresholds": {cid: r.threshold for cid, r in self.references.items()},
            "windows": {cid: r.window for cid, r in self.references.items()},
        }
