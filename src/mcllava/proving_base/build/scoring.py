"""Yes/No scoring of a pool: the LM stage's held-out curve and the gate share it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ...tokens import word_embedding_norm
from .pool import EncodedPool, sample_features


@torch.no_grad()
def yes_no_scores(backbone, pool: EncodedPool, batch: int = 32, features: Callable | None = None) -> torch.Tensor:
    """logit(Yes) - logit(No) at the first answer position of every sample of a pool.

    `features(idx)` gives the placeholder rows of samples `idx` (default: `sample_features`, the pool's projected
    tower features and visual definitions)."""
    norm = word_embedding_norm(backbone.model, len(backbone.tokenizer))
    features = features or (lambda idx: sample_features(backbone, pool, idx, norm))
    out = []
    for i in range(0, len(pool.kinds), batch):
        idx = torch.arange(i, min(i + batch, len(pool.kinds)))
        prompt_len = (pool.labels[idx] == -100).logical_and(pool.attention_mask[idx] == 1).sum(1)
        width = int(prompt_len.max())
        ids, mask = pool.input_ids[idx, :width], (torch.arange(width)[None] < prompt_len[:, None]).long()
        ids, mask = (
            (ids * mask + backbone.tokenizer.pad_token_id * (1 - mask)).to(backbone.device),
            mask.to(backbone.device),
        )
        h = backbone.hidden_states(backbone.embed(ids, features(idx)), mask)
        last = h[torch.arange(len(idx), device=h.device), (prompt_len - 1).to(h.device)]
        out.append(backbone.yes_no_margin(last).cpu())
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
            auc = float(roc_auc_score(ys, [scores[i].item() for i in sel]))
        res[kind] = {
            "n": len(sel),
            "weighted_accuracy": float(np.mean(recalls)),
            "auc": auc,
            "positive_recall": float(np.mean(pos)) if pos else None,
            "negative_recall": float(np.mean(neg)) if neg else None,
        }
        look = [i for i in sel if pool.changed and pool.changed[i]]
        if look:  # which differences the model sees: a look-alike changes one or two traits of the named character
            res[kind]["lookalike_negative_recall"] = float(np.mean([scores[i].item() <= 0 for i in look]))
            by_trait = {
                t: [scores[i].item() <= 0 for i in look if t in pool.changed[i]]
                for t in sorted({t for i in look for t in pool.changed[i]})
            }
            res[kind]["lookalike_recall_by_trait"] = {
                t: {"n": len(v), "recall": float(np.mean(v))} for t, v in by_trait.items()
            }
    return res


@torch.no_grad()
def answer_report(backbone, pool: EncodedPool, batch: int = 16, features: Callable | None = None) -> dict:
    """Teacher-forced answer loss and next-token accuracy per kind of sample (open answers, letters, captions),
    and the share of answers whose every token is predicted: the held-out curve of the evaluation's tasks."""
    norm = word_embedding_norm(backbone.model, len(backbone.tokenizer))
    features = features or (lambda idx: sample_features(backbone, pool, idx, norm))
    head = backbone.model.get_output_embeddings()
    per: dict[str, list[tuple[float, float, bool]]] = {}
    for i in range(0, len(pool.kinds), batch):
        idx = torch.arange(i, min(i + batch, len(pool.kinds)))
        width = int(pool.attention_mask[idx].sum(1).max())
        ids, mask, labels = (
            t[idx, :width].to(backbone.device) for t in (pool.input_ids, pool.attention_mask, pool.labels)
        )
        hidden = backbone.hidden_states(backbone.embed(ids, features(idx)), mask)
        targets = labels[:, 1:]
        for r, j in enumerate(idx.tolist()):
            keep = targets[r] != -100
            logits = head(hidden[r, :-1][keep]).float()
            right = logits.argmax(-1) == targets[r][keep]
            loss = torch.nn.functional.cross_entropy(logits, targets[r][keep]).item()
            per.setdefault(pool.kinds[j], []).append((loss, right.float().mean().item(), bool(right.all())))
    return {
        k: {
            "n": len(v),
            "answer_loss": float(np.mean([x[0] for x in v])),
            "token_accuracy": float(np.mean([x[1] for x in v])),
            "exact": float(np.mean([x[2] for x in v])),
        }
        for k, v in sorted(per.items())
    }
