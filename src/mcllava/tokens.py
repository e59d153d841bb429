"""Concept tokens: the one token bookkeeper shared by training, inference and evaluation.

Each concept `c` owns an identifier token `<c>` and `k` soft tokens `<c_1>..<c_k>`, appended to the tokenizer
and to the input embedding matrix (and to the LM head where it is not tied to the embeddings). Only those rows
ever train: `make_trainable` wraps the embedding (and untied head) in PEFT's trainable-tokens layers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from peft import TrainableTokensConfig, inject_adapter_in_model
from torch import nn

from .errors import McLlavaError


@dataclass
class ConceptTokens:
    """Which token strings and ids belong to which concept, and the system text that introduces them."""

    concept_ids: list[str]
    k: int
    ids: dict[str, list[int]] = field(default_factory=dict)  # concept id -> [id of <c>, ids of <c_1..k>]

    @staticmethod
    def strings_for(cid: str, k: int) -> list[str]:
        return [f"<{cid}>"] + [f"<{cid}_{i}>" for i in range(1, k + 1)]

    def strings(self, cid: str) -> list[str]:
        return self.strings_for(cid, self.k)

    @property
    def all_strings(self) -> list[str]:
        return [s for cid in self.concept_ids for s in self.strings(cid)]

    @property
    def all_ids(self) -> list[int]:
        return [i for cid in self.concept_ids for i in self.ids[cid]]

    @property
    def name_ids(self) -> list[int]:
        """The ids of every identifier `<c>`: the names an answer may say."""
        return [self.ids[cid][0] for cid in self.concept_ids]

    @property
    def soft_ids(self) -> list[int]:
        """The ids of every `<c_i>`: they only ever define a concept, so an answer must never contain one (with a
        tied head, trained rows can outscore every word)."""
        return [i for cid in self.concept_ids for i in self.ids[cid][1:]]

    def token(self, cid: str) -> str:
        return f"<{cid}>"

    def subset(self, cids: list[str]) -> ConceptTokens:
        """The bookkeeping of some of the concepts (same ids): extending a bank trains only the new ones' rows."""
        return ConceptTokens(list(cids), self.k, {cid: self.ids[cid] for cid in cids})

    def introduction(self, cid: str) -> str:
        """`<c> is <c_1><c_2>…<c_k>.` — the text that binds the identifier to its soft tokens."""
        strings = self.strings(cid)
        return f"{strings[0]} is {''.join(strings[1:])}."

    def relevant(self, question: str, seen=()) -> list[str]:
        """The concepts a question needs introduced: those it names as `<id>` and those `seen` in its photo, in bank
        order. Training (`TrainConfig.introduce="relevant"`) and answering use this one rule."""
        seen = set(seen)
        return [c for c in self.concept_ids if c in seen or self.token(c) in question]

    def system_text(self, cids: list[str] | None = None, extra: str = "") -> str:
        """System text introducing the given concepts (all of them by default), plus optional extra text."""
        parts = [self.introduction(c) for c in (self.concept_ids if cids is None else cids)]
        if extra:
            parts.append(extra)
        return " ".join(parts)


def head_is_tied(model) -> bool:
    """True when the LM head shares its weight with the input embeddings (SmolLM2), false for LLaVA-1.5.

    PEFT layers expose their base layer's weight as `.weight`, so this holds before and after `make_trainable`.
    """
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def add_concept_tokens(model, tokenizer, concept_ids: list[str], k: int, pad_to_multiple_of: int = 64) -> ConceptTokens:
    """Add `<c>`, `<c_1..k>` for each concept to the tokenizer and grow the embeddings to hold them.

    The embedding matrix only ever grows: LLaVA-1.5 already has 32064 rows for a 32002-entry tokenizer, so new
    tokens first use those spare rows, and any growth is rounded up to a multiple of `pad_to_multiple_of`.
    """
    tokens = ConceptTokens(concept_ids=list(concept_ids), k=k)
    vocab = tokenizer.get_vocab()
    clashes = [s for s in tokens.all_strings if s in vocab]
    if clashes:
        raise McLlavaError(f"concept tokens already exist in the tokenizer: {', '.join(clashes[:5])}")
    tokenizer.add_tokens(tokens.all_strings, special_tokens=False)
    for cid in tokens.concept_ids:
        tokens.ids[cid] = tokenizer.convert_tokens_to_ids(tokens.strings(cid))
    grow_embeddings(model, len(tokenizer), pad_to_multiple_of)
    return tokens


def grow_embeddings(model, needed: int, pad_to_multiple_of: int = 64) -> None:
    """Make the embedding matrix (and an untied head) hold at least `needed` rows; it never shrinks, and any growth
    is rounded up to a multiple of `pad_to_multiple_of`."""
    rows = model.get_input_embeddings().weight.shape[0]
    if needed > rows:
        model.resize_token_embeddings(math.ceil(needed / pad_to_multiple_of) * pad_to_multiple_of, mean_resizing=False)
    assert model.get_input_embeddings().weight.shape[0] >= max(rows, needed)


def ordinary_rows(model, n_ordinary: int) -> torch.Tensor:
    """The input embedding rows of the tokenizer's original entries (the words the model knows)."""
    return model.get_input_embeddings().weight[:n_ordinary]


def word_embedding_norm(model, n_ordinary: int) -> float:
    """Mean L2 norm of ordinary word embeddings: the scale new concept rows are initialised at."""
    return ordinary_rows(model, n_ordinary).float().norm(dim=-1).mean().item()


@torch.no_grad()
def write_rows(model, tokens: ConceptTokens, input_rows: torch.Tensor, head_rows: torch.Tensor | None = None) -> None:
    """Write concept rows ([m, k+1, D]) into the embedding matrix, and into the head where it is untied."""
    index = torch.tensor(tokens.all_ids, device=model.get_input_embeddings().weight.device)
    emb = model.get_input_embeddings().weight
    emb.index_copy_(0, index, input_rows.reshape(-1, emb.shape[1]).to(emb))
    if not head_is_tied(model):
        head = model.get_output_embeddings().weight
        if head_rows is None:  # a new head row starts at the mean classifier: no token favoured
            head_rows = head[: index.min()].mean(0, keepdim=True).expand(len(index), -1)
        head.index_copy_(0, index.to(head.device), head_rows.reshape(-1, head.shape[1]).to(head))


def make_trainable(model, tokens: ConceptTokens) -> list[nn.Parameter]:
    """Freeze the model and make only the concept rows trainable, with PEFT's trainable-tokens layers.

    PEFT ties the head's layer to the embedding's where the weights are tied; an untied head gets its own rows.
    Returns the trainable parameters (the delta rows), in the order of `tokens.all_ids`.
    """
    model.requires_grad_(False)
    targets = ["embed_tokens"] if head_is_tied(model) else ["embed_tokens", "lm_head"]
    config = TrainableTokensConfig(token_indices=tokens.all_ids, target_modules=targets)
    with warnings.catch_warnings():
        # PEFT warns that it cannot tie adapters on tied models; for trainable tokens it does tie them (the
        # head's layer reads the embedding layer's rows), which is checked just below and in the tests.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        inject_adapter_in_model(config, model)
    if (
        head_is_tied(model)
        and getattr(model.get_output_embeddings(), "tied_adapter", None) is not model.get_input_embeddings()
    ):
        raise McLlavaError("PEFT did not tie the LM head's trainable tokens to the embedding's")
    params = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    for p in params:
        p.requires_grad_(True)
    expected = 1 if head_is_tied(model) else 2
    if len(params) != expected:
        raise McLlavaError(f"expected {expected} trainable-token tensors after PEFT injection, found {len(params)}")
    return params


def trained_rows(model, tokens: ConceptTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read the concept rows back ([m, k+1, D] each; head rows None where tied), from PEFT layers or plain weights."""
    m, width = len(tokens.concept_ids), tokens.k + 1

    def rows_of(layer) -> torch.Tensor:
        delta = getattr(layer, "trainable_tokens_delta", None)
        if delta is not None and "default" in delta:
            rows = delta["default"]
        else:
            index = torch.tensor(tokens.all_ids, device=layer.weight.device)
            rows = layer.weight.index_select(0, index)
        return rows.detach().float().cpu().reshape(m, width, -1).clone()

    input_rows = rows_of(model.get_input_embeddings())
    head_rows = None if head_is_tied(model) else rows_of(model.get_output_embeddings())
    return input_rows, head_rows
