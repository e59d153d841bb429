"""Caption answers for personalisation: written by the base from word definitions, kept only when they name
exactly the concepts shown, sampled per concept and epoch, and carried through a resumed run."""

from __future__ import annotations

import random

import pytest
import torch

from mcllava.backbone import Backbone
from mcllava.captions import distil_captions, whole_sentences
from mcllava.concepts import ConceptSet
from mcllava.evaluate import named_concepts
from mcllava.tiny import make_shape_concepts
from mcllava.train import TrainConfig, personalize
from mcllava.training_data import CAPTION_QUESTION, CatalogEntry, ConceptFacts, DataOptions, build_epoch


def _catalog():
    cat = [CatalogEntry(f"bo/{i}", f"bo{i}.png", None, frozenset(["bo"])) for i in range(4)]
    cat += [CatalogEntry(f"ana/{i}", f"ana{i}.png", None, frozenset(["ana"])) for i in range(3)]
    cat.append(CatalogEntry("_multi/0", "m.png", None, frozenset(["bo", "ana"])))
    cat.append(CatalogEntry("_neg/0", "n.png", None, frozenset()))
    return cat


def named_ids(text: str, known: list[str]) -> set[str]:
    """What the caption filter reads as named: evaluation's `named_concepts`, with `<id>` as the only name."""
    return set(named_concepts(text, known, {c: f"<{c}>" for c in known}))


def test_the_filter_reads_only_known_names_written_as_tokens():
    assert named_ids("<bo> and <ana> near <x> and <kiki>.", ["bo", "ana"]) == {"bo", "ana"}
    assert named_ids("A red dog in a park.", ["bo"]) == set()
    assert named_ids("<Big-Bo> and <bo_2>.", ["Big-Bo", "bo_2", "bo"]) == {"Big-Bo", "bo_2"}
    assert named_ids("Bo and a dog.", ["bo"]) == set()  # the bare word is not the concept's token


def test_a_caption_cut_off_by_the_token_limit_keeps_its_whole_sentences():
    assert whole_sentences("<bo> in a park. <bo> is sitting on the") == "<bo> in a park."
    assert whole_sentences("<bo> in a park.") == "<bo> in a park."
    assert whole_sentences("<bo> sitting on a") == ""  # nothing whole: no caption


def test_distil_keeps_captions_that_name_exactly_the_concepts_shown(scripted_base):
    entries = _catalog()[:2] + _catalog()[4:]  # bo/0, bo/1, ana/0..2, _multi/0, _neg/0
    base = scripted_base(
        {
            "<ana> is a blue square. <bo> is": "<bo> and <ana> in a park.",  # the group photo: both named
            "<bo> is": "<bo> in a kitchen. <bo> is sitting",  # cut off by the token limit: the whole sentence is kept
            "<ana> is": "<bo> in a kitchen.",  # names the wrong concept: dropped
        }
    )
    got = distil_captions(
        base,
        entries,
        {"bo": "a red circle", "ana": "a blue square"},
        lambda chosen: torch.zeros(1, 2, 3),
        progress=False,
    )
    assert got == {"bo/0": "<bo> in a kitchen.", "bo/1": "<bo> in a kitchen.", "_multi/0": "<bo> and <ana> in a park."}
    # every concept shown is defined in words before the question; generic negatives are never captioned
    assert base.prompts[0] == f"<bo> is a red circle. {CAPTION_QUESTION}"
    assert len(base.prompts) == 6
    # a concept without a description cannot be defined in words: its photos get no caption
    none = distil_captions(
        base, entries, {"bo": "a red circle", "ana": None}, lambda chosen: torch.zeros(1, 2, 3), progress=False
    )
    assert set(none) == {"bo/0", "bo/1"}


def test_caption_samples_per_concept_and_epoch():
    concepts = [ConceptFacts("bo"), ConceptFacts("ana")]
    captions = {
        "bo/0": "<bo> in a park.",
        "bo/1": "<bo> on a beach.",
        "ana/2": "<ana> in a kitchen.",
        "_multi/0": "<bo> and <ana>.",
    }
    plain = build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False), captions)
    assert not [s for s in plain if s.kind == "caption"]  # off by default, and the rest of the epoch unchanged:
    assert [(s.question, s.answer) for s in plain] == [
        (s.question, s.answer) for s in build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False))
    ]
    samples = build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False, captions=2), captions)
    cap = [s for s in samples if s.kind == "caption"]
    assert len(cap) == 4
    for s in cap:
        assert s.question == CAPTION_QUESTION and s.answer == captions[s.image.key]
        assert not s.image.flip  # a mirrored photo would contradict "on the left"
    keys = [s.image.key for s in cap]
    assert {"ana/2", "_multi/0"} <= set(keys)  # ana has exactly two captioned photos: both drawn
    assert sum(k.startswith("bo/") for k in keys) >= 1 and len(set(keys)) >= 3
    # a concept with fewer captioned photos than asked gets what there is
    few = build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False, captions=5), captions)
    assert sum(s.kind == "caption" for s in few) == 3 + 2


@pytest.mark.slow  # personalises the pretrained tiny base
@pytest.mark.parametrize("interrupt", [False, True])
def test_personalize_trains_on_captions_and_resumes_with_the_same_ones(tmp_path, tiny_base_dir, monkeypatch, interrupt):
    """The captions and open answers are written once, before concept tokens exist, and a resumed run reads them
    from the checkpoint instead of asking the base again."""
    import mcllava.train as train_mod

    concepts_dir, _ = make_shape_concepts(
        tmp_path / "w", {"bo": ("red", "circle"), "ana": ("blue", "square")}, n_train=4, n_test=1, seed=2
    )
    calls, seen = [], []

    def fake_distil(backbone, entries, descriptions, features, progress=True):
        calls.append(len(backbone.tokenizer))
        return {e.key: "<" + sorted(e.present)[0] + "> in a park." for e in entries if len(e.present) == 1}

    real_build = train_mod.build_epoch

    def spy(*args, **kwargs):
        samples = real_build(*args, **kwargs)
        seen.extend(s for s in samples if s.kind in ("caption", "open"))
        return samples

    answer_calls = []

    def fake_answers(backbone, entries, descriptions, features, questions, progress=True):
        answer_calls.append(len(backbone.tokenizer))
        return {e.key: [[c, questions[0], f"<{c}> is sitting."] for c in sorted(e.present)] for e in entries}

    monkeypatch.setattr(train_mod, "distil_captions", fake_distil)
    monkeypatch.setattr(train_mod, "distil_answers", fake_answers)
    monkeypatch.setattr(train_mod, "build_epoch", spy)
    cfg = TrainConfig(
        k=2,
        epochs=2,
        lr=1e-2,
        batch_size=8,
        data=DataOptions(short_answers=True, text=False, captions=1, open_answers=1),
    )

    def run(resume=False):
        backbone = Backbone.load(tiny_base_dir)
        cs = ConceptSet.load(concepts_dir, tokenizer=backbone.tokenizer)
        return personalize(
            cs, backbone, tmp_path / "bank", cfg, resume=resume, progress=False, log=lambda *_: None
        ), len(backbone.tokenizer)

    if interrupt:
        original = train_mod.probe_accuracy

        def cut(*args, **kwargs):
            if cut.n == 1:
                raise KeyboardInterrupt
            cut.n += 1
            return original(*args, **kwargs)

        cut.n = 0
        monkeypatch.setattr(train_mod, "probe_accuracy", cut)
        with pytest.raises(KeyboardInterrupt):
            run()
        monkeypatch.setattr(train_mod, "probe_accuracy", original)
    result, _ = run(resume=True)
    assert len(calls) == 1  # written once, also across the interruption
    backbone = Backbone.load(tiny_base_dir)
    assert calls[0] == len(backbone.tokenizer)  # before the concept tokens were added
    assert len(answer_calls) == 1 and answer_calls[0] == calls[0]  # open answers too: once, before the tokens
    captioned = [s for s in seen if s.kind == "caption"]
    assert len(captioned) == 2 * (3 if interrupt else 2)  # one per concept in each epoch built (the cut one too)
    assert {s.answer for s in captioned} == {"<bo> in a park.", "<ana> in a park."}
    opened = [s for s in seen if s.kind == "open"]
    assert len(opened) == len(captioned) and {(s.question, s.answer) for s in opened} == {
        ("What is <bo> doing?", "<bo> is sitting."),
        ("What is <ana> doing?", "<ana> is sitting."),
    }
    assert len(result.history) == 2
