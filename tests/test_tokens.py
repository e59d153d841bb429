"""Concept tokens, k-means initialisation and training-sample construction (no training of the model)."""

from __future__ import annotations

import random

import torch

from mcllava.kmeans_init import kmeans_rows, masked_tokens, random_rows
from mcllava.tokens import (
    add_concept_tokens,
    head_is_tied,
    make_trainable,
    trained_rows,
    word_embedding_norm,
    write_rows,
)
from mcllava.training_data import (
    NO_ANSWERS,
    RECOGNITION_QUESTIONS,
    YES_ANSWERS,
    CatalogEntry,
    ConceptFacts,
    DataOptions,
    build_epoch,
)


def test_add_tokens_grows_never_shrinks_and_pads(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    rows_before = model.get_input_embeddings().weight.shape[0]
    n_before = len(tok)
    tokens = add_concept_tokens(model, tok, ["bo", "ana"], k=4)
    assert len(tok) == n_before + 10
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= rows_before and rows >= len(tok) and rows % 64 == 0
    assert tokens.ids["bo"] == tok.convert_tokens_to_ids(["<bo>", "<bo_1>", "<bo_2>", "<bo_3>", "<bo_4>"])
    # Each concept token is a single token inside ordinary text.
    ids = tok("Is <bo> with <ana_2>?", add_special_tokens=False)["input_ids"]
    assert tokens.ids["bo"][0] in ids and tokens.ids["ana"][2] in ids
    assert tokens.system_text(["bo"]) == "<bo> is <bo_1><bo_2><bo_3><bo_4>."


def test_kmeans_rows_have_word_norm_and_are_deterministic(tiny_backbone):
    feats = torch.randn(200, 64) * 3 + 1
    norm = word_embedding_norm(tiny_backbone.model, len(tiny_backbone.tokenizer))
    a = kmeans_rows(feats, k=8, norm=norm, seed=3)
    b = kmeans_rows(feats, k=8, norm=norm, seed=3)
    assert a.shape == (9, 64)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.full((9,), norm), rtol=1e-4)
    # Row 0 points along the mean of the centres.
    cos = torch.nn.functional.cosine_similarity(a[0], a[1:].mean(0), dim=0)
    assert cos > 0.999
    # Fewer tokens than k still gives k distinct centres.
    few = kmeans_rows(torch.randn(3, 64), k=8, norm=norm, seed=0)
    assert few.shape == (9, 64) and torch.isfinite(few).all()
    r = random_rows(8, 64, norm, seed=1)
    assert torch.allclose(r.norm(dim=-1), torch.full((9,), norm), rtol=1e-4)


def test_masked_tokens_keep_covered_patches():
    patches = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    coverage = torch.tensor([[1.0, 0.6, 0.2, 0.0], [0.1, 0.3, 0.0, 0.0]])
    out = masked_tokens(patches, coverage)
    # image 0: patches 0 and 1; image 1: nothing reaches 0.5, so its best-covered patch (1) alone
    assert torch.equal(out, torch.stack([patches[0, 0], patches[0, 1], patches[1, 1]]))


def test_only_new_rows_train(tiny_backbone):
    """After optimiser steps through PEFT trainable tokens, every other parameter is bit-identical."""
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    tokens = add_concept_tokens(model, tok, ["bo"], k=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not head_is_tied(model)
    params = make_trainable(model, tokens)
    assert len(params) == 2  # embedding rows and (untied) head rows
    opt = torch.optim.AdamW(params, lr=1e-2)
    backbone = tiny_backbone
    enc = backbone.encode(backbone.format_prompt("Is <bo> here?", system=tokens.system_text(), image=False), "Yes.")
    ids = torch.tensor([enc.input_ids])
    for _ in range(3):
        loss = backbone.answer_loss(ids, torch.ones_like(ids), torch.tensor([enc.labels]), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    for name, old in before.items():
        new = after.get(name) if name in after else after[name.replace(".weight", ".base_layer.weight")]
        assert torch.equal(old, new), f"{name} changed"
    input_rows, head_rows = trained_rows(model, tokens)
    emb_old = before["model.language_model.embed_tokens.weight"][tokens.all_ids]
    assert not torch.allclose(input_rows.reshape(-1, 64), emb_old)
    assert head_rows is not None and head_rows.shape == (1, 4, 64)


def test_write_rows_round_trip(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    tokens = add_concept_tokens(model, tok, ["bo", "ana"], k=2)
    rows = torch.randn(2, 3, 64)
    head = torch.randn(2, 3, 64)
    write_rows(model, tokens, rows, head)
    got_rows, got_head = trained_rows(model, tokens)
    assert torch.equal(got_rows, rows) and torch.equal(got_head, head)


def _catalog():
    cat = []
    for cid, n in (("bo", 5), ("ana", 3), ("kiki", 2)):
        cat += [CatalogEntry(f"{cid}/{i}", f"{cid}{i}.png", None, frozenset([cid])) for i in range(n)]
    cat.append(CatalogEntry("_multi/0", "m.png", None, frozenset(["bo", "ana"])))
    cat += [CatalogEntry(f"_neg/{i}", f"n{i}.png", None, frozenset()) for i in range(2)]
    return cat


def test_epoch_is_balanced_and_uses_other_concepts_as_negatives():
    concepts = [
        ConceptFacts("bo", "a dog", [{"question": "How old is <bo>?", "answer": "<bo> is 3."}]),
        ConceptFacts("ana"),
        ConceptFacts("kiki"),
    ]
    samples = build_epoch(_catalog(), concepts, random.Random(0))
    for cid in ("bo", "ana", "kiki"):
        rec = [s for s in samples if s.kind in ("positive", "negative") and s.concepts == (cid,)]
        yes = [s for s in rec if s.answer.startswith("Yes")]
        no = [s for s in rec if s.answer.startswith("No")]
        assert len(yes) == len(no) > 0
        # negatives never show the concept
        assert all(cid not in s.image.key.split("/")[0] or s.image.key.startswith("_") for s in no)
    assert sum(s.kind == "group" for s in samples) == 2  # one Yes and one No on the group photo
    texts = [s for s in samples if s.kind == "text"]
    assert {s.answer for s in texts} == {"<bo> is a dog", "<bo> is 3."}
    # deterministic for the seed, and flips happen
    again = build_epoch(_catalog(), concepts, random.Random(0))
    assert [(s.question, s.answer, s.image) for s in samples] == [(s.question, s.answer, s.image) for s in again]
    assert any(s.image and s.image.flip for s in samples) and any(s.image and not s.image.flip for s in samples)
    unbalanced = build_epoch(_catalog(), concepts, random.Random(0), DataOptions(balance=False, flip=False))
    assert sum(s.kind == "negative" for s in unbalanced) > sum(s.kind == "positive" for s in unbalanced)


def test_group_pairs_teach_both_not_either():
    """More (Yes, No) pairs per group photo: as many No as Yes, and each No asks about two concepts of which the
    photo shows at most one (the group photo with an absent concept first, then photos of one concept alone)."""
    concepts = [ConceptFacts("bo"), ConceptFacts("ana"), ConceptFacts("kiki")]
    entries = {e.key: e for e in _catalog()}
    one = [s for s in build_epoch(_catalog(), concepts, random.Random(0), DataOptions(text=False)) if s.kind == "group"]
    samples = build_epoch(_catalog(), concepts, random.Random(0), DataOptions(text=False, group_pairs=4))
    group = [s for s in samples if s.kind == "group"]
    yes = [s for s in group if s.answer.startswith("Yes")]
    no = [s for s in group if s.answer.startswith("No")]
    assert len(yes) == len(no) == 4 and len(one) == 2
    assert all(s.image.key == "_multi/0" and set(s.concepts) == {"bo", "ana"} for s in yes)
    for s in no:
        assert len(s.concepts) == 2 and not set(s.concepts) <= entries[s.image.key].present
    assert sum(s.image.key == "_multi/0" for s in no) == 1  # the absent-concept one
    alone = [s for s in no if s.image.key != "_multi/0"]
    assert len(alone) == 3 and all(
        set(s.concepts) == {"bo", "ana"} and len(entries[s.image.key].present) == 1 for s in alone
    )


def test_short_answers_take_the_bases_own_form():
    """A base trained on "Yes" / "No" (the proving ground) must not be taught a full stop on every answer:
    recognition and group samples both use `DataOptions.yes_no`."""
    concepts = [ConceptFacts("bo"), ConceptFacts("ana"), ConceptFacts("kiki")]
    default = build_epoch(_catalog(), concepts, random.Random(0), DataOptions(short_answers=True, text=False))
    assert {s.answer for s in default} == {"Yes.", "No."}
    bare = build_epoch(
        _catalog(), concepts, random.Random(0), DataOptions(short_answers=True, text=False, yes_no=("Yes", "No"))
    )
    assert {s.answer for s in bare} == {"Yes", "No"}
    assert [s.kind for s in bare] == [s.kind for s in default]


def test_text_per_concept_draws_that_many_distinct_text_samples():
    facts = [{"question": f"Fact {i} of <bo>?", "answer": f"answer {i}"} for i in range(5)]
    concepts = [ConceptFacts("bo", "a dog", facts), ConceptFacts("ana", None, facts[:1]), ConceptFacts("kiki")]
    every = [s for s in build_epoch(_catalog(), concepts, random.Random(0)) if s.kind == "text"]
    assert [s.concepts for s in every] == [("bo",)] * 6 + [("ana",)]  # description and five facts; one fact
    seen = set()
    for seed in range(30):
        options = DataOptions(text_per_concept=2)
        text = [s for s in build_epoch(_catalog(), concepts, random.Random(seed), options) if s.kind == "text"]
        bo = [(s.question, s.answer) for s in text if s.concepts == ("bo",)]
        assert len(bo) == len(set(bo)) == 2 and [s.concepts for s in text].count(("ana",)) == 1
        seen.update(a for _, a in bo)
    assert "<bo> is a dog" in seen and {f"answer {i}" for i in range(5)} <= seen  # every one is drawn in time
    assert not [
        s
        for s in build_epoch(_catalog(), concepts, random.Random(0), DataOptions(text_per_concept=0))
        if s.kind == "text"
    ]


def test_hard_negatives_make_half_of_a_concepts_negatives():
    cat = _catalog() + [CatalogEntry(f"_neg/{i}", f"n{i}.png", None, frozenset()) for i in range(2, 40)]
    hard = ("_neg/7", "_neg/8", "_neg/9")
    concepts = [ConceptFacts("bo", hard_negatives=hard), ConceptFacts("ana"), ConceptFacts("kiki")]
    for seed in range(5):
        samples = build_epoch(cat, concepts, random.Random(seed), DataOptions(text=False))
        no = [s.image.key for s in samples if s.kind == "negative" and s.concepts == ("bo",)]
        assert len(no) == 6 and len(set(no)) == 6  # balanced against bo's 6 photos (one a group photo), no repeats
        assert sum(k in hard for k in no) == 3  # half from the mined ones, the rest from anywhere else
        ana = [s.image.key for s in samples if s.kind == "negative" and s.concepts == ("ana",)]
        assert len(ana) == 4
    # a "hard negative" that shows the concept is never used as a negative
    odd = build_epoch(cat, [ConceptFacts("bo", hard_negatives=("bo/0", "_multi/0")), *concepts[1:]], random.Random(0))
    assert not [
        s for s in odd if s.kind == "negative" and s.concepts == ("bo",) and s.image.key in ("bo/0", "_multi/0")
    ]


def test_template_counts():
    assert len(set(RECOGNITION_QUESTIONS)) >= 20
    assert len(set(YES_ANSWERS)) >= 20 and all(a.startswith("Yes") for a in YES_ANSWERS)
    assert len(set(NO_ANSWERS)) >= 20 and all(a.startswith("No") for a in NO_ANSWERS)


def test_tied_head_reads_the_trained_rows(tokenizer):
    """On a tied model (SmolLM2 style) the head's logits for concept tokens move with the trained input rows."""
    from mcllava.tiny import build_tiny_llava

    model, _ = build_tiny_llava(tokenizer, tied=True)
    tokens = add_concept_tokens(model, tokenizer, ["bo"], k=2)
    (params,) = make_trainable(model, tokens)
    with torch.no_grad():
        params.add_(1.0)
    h = torch.randn(2, 64)
    logits = model.get_output_embeddings()(h)
    rows, head = trained_rows(model, tokens)
    assert head is None
    assert torch.allclose(logits[:, tokens.all_ids], h @ rows.reshape(-1, 64).T, atol=1e-5)
