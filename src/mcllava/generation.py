"""Generation helpers for `Backbone.generate`: the key-value cache of a prefix successive prompts share, and
a cheap way to ban token ids.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor


def cache_kwarg(model) -> str:
    """The model's key-value cache argument: `cache` in recent transformers, `past_key_values` before."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:  # once per class: it is asked on every training step and answer
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class PromptCache:
    """The key-value cache of the prefix that successive prompts share, for `Backbone.generate`.

    With a bank loaded, every question starts with the same chat-template start and system text introducing
    every concept: with 50 concepts that is most of the prompt. The cache keeps the longest prefix (in input
    embeddings, so concept rows written since cannot be reused stale) that the last two prompts shared, runs it
    once, and hands each later prompt that starts with it a copy, so only the rest of the prompt is computed.
    Greedy answers are the same as without it (up to float rounding); `enabled = False` turns it off. It holds
    the prefix's keys and values and copies them for each answer (per prefix token: layers x 2 x KV width, in the
    model's dtype; ~0.5 MB on LLaVA-1.5-7B in bf16, so ~0.9 GB for 50 concepts' system text).
    """

    min_tokens = 32  # shorter shared prefixes are not worth a cache

    def __init__(self) -> None:
        self.enabled = True
        self.prefix: torch.Tensor | None = None  # [P, D] input embeddings of the cached prefix
        self.cache = None  # its key-value cache (a transformers DynamicCache)
        self.last: torch.Tensor | None = None  # the last prompt's embeddings, to find a new shared prefix
        self._lock = threading.Lock()

    def lookup(self, lm: torch.nn.Module, embeds: torch.Tensor):
        """A private copy of the cache if `embeds` ([L, D]) starts with the cached prefix, else None; learns a
        new prefix from the last prompt when this one shares enough of it (running it through `lm`, the language
        model)."""
        if not self.enabled:
            return None
        with self._lock:
            last, self.last = self.last, embeds
            if self.prefix is None or not _starts_with(embeds, self.prefix):
                shared = _shared_rows(embeds, last) if last is not None else 0
                if shared < self.min_tokens:
                    return None
                self.prefix, self.cache = embeds[:shared].clone(), _prefill(lm, embeds[:shared])
            return copy.deepcopy(self.cache)

    def clear(self) -> None:
        with self._lock:
            self.prefix = self.cache = self.last = None


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading rows two [L, D] embeddings have in common, leaving at least one row of `a` uncovered."""
    n = min(len(a), len(b), len(a) - 1)
    same = (a[:n] == b[:n]).all(-1)
    return int(same.long().cumprod(0).sum())


def _starts_with(embeds: torch.Tensor, prefix: torch.Tensor) -> bool:
    return len(embeds) > len(prefix) and torch.equal(embeds[: len(prefix)], prefix)


@torch.no_grad()
def _prefill(lm: torch.nn.Module, prefix: torch.Tensor):
    """The key-value cache of the language model `lm` after reading `prefix` ([P, D] input embeddings)."""
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=prefix[None], use_cache=True, **{cache_kwarg(lm): cache})
    return cache


class SuppressIds(LogitsProcessor):
    """Never generate the given token ids (their scores become -inf): what `generate(suppress_tokens=...)` does,
    without its per-step `isin` over the whole vocabulary, which costs milliseconds a token on a CPU and grows with
    the number of ids (thousands with many banks on one base)."""

    def __init__(self, ids: Sequence[int], device: torch.device | str = "cpu"):
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.ids.to(scores.device), float("-inf"))
