"""The quality gate's checks of the MC-LLaVA evaluation's tasks (`tasks.py`), on characters never seen in training.

Samples come from the personal half of identity space on the gate's world seed; names are defined by words or by
visual rows (k-means rows of another photo), as in training. Answers are generated greedily and scored as
`mcllava eval` scores them:
- choice: the official exact match of the bare letter (and our lenient parse of it);
- open answers: the official character BLEU, and whether the answer's key phrase ("jumping", "to the left of
  <y>", "in a park") is in the output;
- where: the exact position phrase ("on the left, near the camera"), and its left / centre / right part alone;
- named captions: recall and precision of the defined names the caption says (`<x>`), and the official recall;
- facts: the exact answer (a fact, a letter, or "<x> is a red striped cat.").
These checks are reported, not gated: no build has been trained on them yet, so no threshold has a measurement
behind it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import scoring_official as official
from ..evaluate import parse_choice
from ..tokens import word_embedding_norm
from .build.pool import EncodedPool, encode_pool, sample_features
from .data import DEFINITION_SLOT, TASK_KINDS
from .data import rng_for as data_rng
from .tasks import task_sample

MAX_NEW_TOKENS = {"choice": 4, "open": 24, "where": 24, "named_caption": 72, "facts": 20}
NAME = re.compile(r"<[^<>\s]+>")


def task_samples(kind: str, n: int, seed: int, size: int) -> list[dict]:
    """`n` gate samples of one task, personal-half characters, each fixed by (seed, kind, index)."""
    start = 3 * 10**6 + TASK_KINDS.index(kind) * 10**5
    return [task_sample(data_rng(seed, "named", start + i), kind, size, half="personal") for i in range(n)]


@torch.no_grad()
def generate_pool(backbone, pool: EncodedPool, max_new_tokens: int, progress: Callable | None = None) -> list[str]:
    """Greedy answers to every prompt of a pre-encoded pool, visual definitions and image rows in place."""
    norm = word_embedding_norm(backbone.model, len(backbone.tokenizer))
    outs = []
    for i in range(len(pool.kinds)):
        n = int(((pool.labels[i] == -100) & (pool.attention_mask[i] == 1)).sum())
        ids = pool.input_ids[i : i + 1, :n].to(backbone.device)
        embeds = backbone.embed(ids, sample_features(backbone, pool, torch.tensor([i]), norm))
        outs.append(backbone.generate_from_embeds(embeds, max_new_tokens).strip())
        if progress is not None:
            progress()
    return outs


def _mean(xs: list) -> float | None:
    return float(np.mean(xs)) if xs else None


def _by(samples: list[dict], values: list, key: str = "sub") -> dict:
    groups: dict[str, list] = {}
    for s, v in zip(samples, values):
        groups.setdefault(str(s.get(key)), []).append(v)
    return {k: {"n": len(v), "score": _mean(v)} for k, v in sorted(groups.items())}


def _examples(samples: list[dict], outs: list[str], n: int = 5) -> list[dict]:
    return [{"question": s["question"], "answer": s["answer"], "output": o} for s, o in zip(samples[:n], outs)]


def score_choice(samples: list[dict], outs: list[str]) -> dict:
    """Official exact letter, and our lenient parse (a letter or an option's text)."""
    exact = [official.exact(o, s["answer"]) for s, o in zip(samples, outs)]
    lenient = [parse_choice(o, s["options"]) == s["answer"] for s, o in zip(samples, outs)]
    return {
        "n": len(samples),
        "accuracy": _mean(exact),
        "lenient_accuracy": _mean(lenient),
        "by_kind": _by(samples, exact),
        "by_form": _by(samples, exact, "form"),
    }


def score_open(samples: list[dict], outs: list[str]) -> dict:
    """Official character BLEU and key-phrase accuracy (the answer beyond "<x> is", case-insensitive)."""
    bleu = [official.bleu(s["answer"], o) for s, o in zip(samples, outs)]
    key = [s["key"].lower() in o.lower() for s, o in zip(samples, outs)]
    return {
        "n": len(samples),
        "bleu": _mean(bleu),
        "key_accuracy": _mean(key),
        "by_kind": _by(samples, key),
        "by_form": _by(samples, key, "form"),
    }


def score_where(samples: list[dict], outs: list[str]) -> dict:
    """The exact position phrase in the output, and its left / centre / right part alone."""
    phrase = [s["key"] in o for s, o in zip(samples, outs)]
    side = [s["key"].split(",")[0] in o for s, o in zip(samples, outs)]
    return {
        "n": len(samples),
        "accuracy": _mean(phrase),
        "side_accuracy": _mean(side),
        "bleu": _mean([official.bleu(s["answer"], o) for s, o in zip(samples, outs)]),
        "by_form": _by(samples, phrase, "form"),
    }


def score_named_captions(samples: list[dict], outs: list[str]) -> dict:
    """Recall of the present defined names among the names a caption says, precision of the names it says
    (None when no caption says any), and the official caption recall."""
    present = said = hits = 0
    scores = []
    for s, o in zip(samples, outs):
        names = set(NAME.findall(o))
        present, said, hits = present + len(s["present"]), said + len(names), hits + len(names & set(s["present"]))
        score = official.caption_score(o, [p.strip("<>") for p in s["present"]])
        if score is not None:
            scores.append(score)
    return {
        "n": len(samples),
        "recall": hits / present if present else None,
        "precision": hits / said if said else None,
        "names_said": said,
        "official_recall": _mean(scores),
    }


def score_facts(samples: list[dict], outs: list[str]) -> dict:
    """The exact answer (a trailing full stop aside)."""
    exact = [o.rstrip(".") == s["answer"].rstrip(".") for s, o in zip(samples, outs)]
    return {"n": len(samples), "accuracy": _mean(exact), "by_kind": _by(samples, exact)}


SCORERS = {
    "choice": score_choice,
    "open": score_open,
    "where": score_where,
    "named_caption": score_named_captions,
    "facts": score_facts,
}


def run_task_checks(
    backbone, model, counts: dict[str, int], seed: int, size: int, rows: int, progress: bool = True
) -> dict:
    """Each task of `counts` (kind -> number of samples, `data.TASK_KINDS`): its report with examples."""
    res = {}
    samples = {k: task_samples(k, n, seed, size) for k, n in counts.items() if n > 0}
    bar = tqdm(total=sum(map(len, samples.values())), desc="gate: tasks", disable=not progress)
    for kind, ss in samples.items():
        pool = encode_pool(backbone, model, ss, size, rows=rows)
        outs = generate_pool(backbone, pool, MAX_NEW_TOKENS[kind], progress=lambda: bar.update(1))
        res[kind] = {**SCORERS[kind](ss, outs), "examples": _examples(ss, outs)}
    bar.close()
    return res


def by_names(scores: torch.Tensor, samples: list[dict]) -> dict:
    """Yes/No weighted accuracy of visual-definition recognition split by how many names the system text defines."""
    out = {}
    counts = [s["system"].count(DEFINITION_SLOT) for s in samples]
    for n in sorted(set(counts)):
        sel = [i for i, c in enumerate(counts) if c == n]
        pos = [bool(scores[i] > 0) for i in sel if samples[i]["answer"] == "Yes"]
        neg = [bool(scores[i] <= 0) for i in sel if samples[i]["answer"] == "No"]
        out[str(n)] = {
            "n": len(sel),
            "weighted_accuracy": _mean([x for x in (_mean(pos), _mean(neg)) if x is not None]),
            "positive_recall": _mean(pos),
            "negative_recall": _mean(neg),
        }
    return out


def task_summary(res: dict) -> dict:
    """The new checks' headline figures (None where a check did not run)."""

    def get(*path: str):
        d = res
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    return {
        "choice_accuracy": get("choice", "accuracy"),
        "open_bleu": get("open", "bleu"),
        "open_key_accuracy": get("open", "key_accuracy"),
        "where_accuracy": get("where", "accuracy"),
        "caption_name_recall": get("named_caption", "recall"),
        "caption_name_precision": get("named_caption", "precision"),
        "facts_accuracy": get("facts", "accuracy"),
        "visual_one_weighted_accuracy": get("visual_definition_recognition", "by_names", "1", "weighted_accuracy"),
        "visual_two_weighted_accuracy": get("visual_definition_recognition", "by_names", "2", "weighted_accuracy"),
        "lookalike_rejection_words": get("definition_recognition", "lookalike_negative_recall"),
        "lookalike_rejection_visual": get("visual_definition_recognition", "lookalike_negative_recall"),
    }
