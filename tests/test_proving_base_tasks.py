"""The base's samples of the evaluation's tasks (`proving_base.tasks`), their encoding and their gate checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mcllava.backbone import Backbone
from mcllava.errors import McLlavaError
from mcllava.evaluate import format_question
from mcllava.proving_base.build import LMStage
from mcllava.proving_base.build.config import v3_phases
from mcllava.proving_base.build.pool import encode_pool, lm_loss
from mcllava.proving_base.data import DEFINITION_SLOT, KINDS, TASK_KINDS, Curriculum, rng_for
from mcllava.proving_base.gate import GateConfig, run_gate
from mcllava.proving_base.gate_tasks import score_choice, score_named_captions, score_open
from mcllava.proving_base.model import VisionSpec, build_llava, proving_tokenizer, tiny_text_model
from mcllava.proving_base.tasks import defined_scene, lm_sample, question_kind, task_sample
from mcllava.scoring_official import CHOICE_SUFFIX
from mcllava.tokens import word_embedding_norm
from mcllava.world.questions import NOTHING, position_phrase, tok
from mcllava.world.render import HELD_WORDS
from mcllava.world.scenes import SETTING_PHRASES
from mcllava.world.traits import is_personal_half, noun_phrase

SIZE = 64
N = 24


def _with_scene(kind: str, i: int) -> tuple[dict, object]:
    """A sample and the scene it shows: every visual task draws its `defined_scene` first from the same stream."""
    s = task_sample(rng_for(0, "lm", i), kind, SIZE)
    ds = defined_scene(rng_for(0, "lm", i), SIZE, min_present=0 if kind == "named_caption" else 1)
    assert s["system"] == ds.system and s["present"] == [tok(c) for c in ds.facts.present]
    return s, ds


def _check_definitions(s: dict, ds) -> None:
    """1-3 names, defined by visual rows (one slot and one reference photo each) or by words; base half only."""
    assert 1 <= len(ds.names) <= 3 and all(not is_personal_half(d) for d in ds.defined)
    slots = s["system"].count(DEFINITION_SLOT)
    assert slots == (len(ds.names) if s["form"] == "visual" else 0) == len(s["refs"])
    assert all(f"{tok(c)} is " in s["system"] for c in ds.names)


def test_choice_letter_points_at_the_truth():
    forms, subs = set(), set()
    for i in range(N):
        s, ds = _with_scene("choice", i)
        _check_definitions(s, ds)
        assert s["answer"] in s["options"] and len(s["answer"]) == 1 and len(s["options"]) == 3
        c = s["about"][0].strip("<>")
        a, k = ds.facts.actor(c), ds.facts.index[c]
        truth = {
            "action": a.action,
            "held": HELD_WORDS[a.held] if a.held else NOTHING,
            "color": a.identity.color,
            "accessory": a.identity.accessory_color,
            "category": a.identity.category,
            "position": position_phrase(ds.scene, k),
        }[s["sub"]]
        assert s["options"][s["answer"]] == truth == s["truth"]
        # worded as `mcllava eval` asks it: the options listed, then our instruction or the official suffix
        first = s["question"].split("\n")[0]
        rec = {"task": "choice", "question": first, "options": s["options"]}
        asked = [format_question(rec, p, [tok(n) for n in ds.names]) for p in ("ours", "official")]
        assert s["question"] in asked
        forms.add(s["question"].endswith(CHOICE_SUFFIX))
        subs.add(s["sub"])
    assert forms == {True, False} and len(subs) >= 4


def test_open_and_where_answers_match_the_scene():
    subs = set()
    for i in range(N):
        s, ds = _with_scene("open", i)
        _check_definitions(s, ds)
        c = s["about"][0].strip("<>")
        a, k, t = ds.facts.actor(c), ds.facts.index[c], tok(c)
        want = {
            "action": f"{t} is {a.action}.",
            "held": f"{t} is holding {HELD_WORDS[a.held]}." if a.held else f"{t} is not holding anything.",
            "position": f"{t} is {position_phrase(ds.scene, k)}.",
            "setting": f"{t} is {SETTING_PHRASES[ds.scene.spec.setting]}.",
            "category": f"{t} is {noun_phrase(a.identity)}.",
        }
        if s["sub"] == "relative":
            o = s["about"][1].strip("<>")
            (b0, b1) = ds.facts.boxes[c], ds.facts.boxes[o]
            side = "left" if (b0[0] + b0[2]) < (b1[0] + b1[2]) else "right"
            assert s["answer"] == f"{t} is to the {side} of {tok(o)}." and s["key"] == f"to the {side} of {tok(o)}"
        else:
            assert s["answer"] == want[s["sub"]] and s["answer"] == f"{t} is {s['key']}."
        assert question_kind(s["question"]) == s["sub"]
        subs.add(s["sub"])
        w, ds = _with_scene("where", i)
        c = w["about"][0].strip("<>")
        assert w["question"] == f"Where is {tok(c)}?"
        assert w["answer"] == f"{tok(c)} is {position_phrase(ds.scene, ds.facts.index[c])}." and w["key"] in w["answer"]
    assert len(subs) >= 5


def test_named_caption_names_exactly_the_defined_characters_present():
    lookalikes = 0
    for i in range(N):
        s, ds = _with_scene("named_caption", i)
        shown = {tok(a.ref) for a in ds.scene.spec.actors if a.role == "concept"}
        assert set(re.findall(r"<[a-z]+>", s["answer"])) == shown == set(s["present"])
        assert all(f"{n} is " in s["answer"] for n in shown)  # each one's action and place
        lookalikes += any(a.role == "distractor" for a in ds.scene.spec.actors)
        assert s["question"] == "Describe this photo." or all(n in s["question"] for n in s["names"])
    assert lookalikes > 0  # look-alikes stand among the characters described, never named


def test_facts_are_answered_from_the_introduction():
    subs = set()
    for i in range(120):  # text only: fast
        s = task_sample(rng_for(1, "lm", i), "facts")
        assert s["image"] is None and DEFINITION_SLOT not in s["system"]
        sub, q, a = s["sub"], s["question"], s["answer"]
        subs.add(sub)
        if sub == "fact":
            assert f"{q} {a}." in s["system"]
        elif sub == "category":
            assert a.removeprefix(q.split()[-1].rstrip("?") + " is ").rstrip(".") in s["system"]
        elif sub == "fact_choice":
            lines = q.split("\n")
            options = dict(line.split(". ", 1) for line in lines[1:4])
            assert f"{lines[0]} {options[a]}." in s["system"]
        else:  # older: the introduction's ages decide
            names = re.findall(r"<[a-z]+>", q.split("\n")[0])
            ages = [int(re.search(rf"How old is {n}\? (\d+)", s["system"]).group(1)) for n in names]
            assert a == "AB"[int(np.argmax(ages))]
    assert subs == {"fact", "fact_choice", "older", "category"}


def test_samples_are_fixed_by_seed_and_index_and_old_mixes_unchanged():
    cur = Curriculum(2, 0.5, (0.1, 0.1, 0.1, 0.1, 0.1, 0.1), tasks={k: 1.0 for k in TASK_KINDS})
    for i in range(8):
        a, b = lm_sample(3, i, cur, SIZE), lm_sample(3, i, cur, SIZE)
        assert (a["question"], a["answer"], a.get("system")) == (b["question"], b["answer"], b.get("system"))
        if a["image"] is not None:
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    kinds = {lm_sample(0, i, cur, SIZE)["kind"] for i in range(60)}
    assert set(TASK_KINDS) <= kinds
    # without task weights only the six old kinds (generic questions report their own kind) come out
    old = {lm_sample(0, i, Curriculum(2, 0.5), SIZE)["kind"] for i in range(40)}
    assert not old & set(TASK_KINDS) and {"defined", "visual_defined"} <= old
    with pytest.raises(McLlavaError, match="unknown kind"):
        Curriculum(tasks={"chioce": 1.0})
    assert len(KINDS) == 6


def test_v3_phases_keep_recognition_and_add_every_task():
    phases = v3_phases()
    assert (
        LMStage(phases=phases).steps == 700
        and [p.steps for p in v3_phases(800)] == [240, 560]
        and not any(p.oracle for p in phases)
    )
    for p in phases:
        assert set(p.curriculum.tasks) == set(TASK_KINDS) and min(p.curriculum.tasks.values()) > 0
        assert p.curriculum.mix[3] + p.curriculum.mix[4] > 0  # recognition kept up
    total = [sum(p.curriculum.mix) + sum(p.curriculum.tasks.values()) for p in phases]
    assert all(t == pytest.approx(1.0) for t in total)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok_ = proving_tokenizer(tmp_path_factory.mktemp("tok"))
    model, processor = build_llava(
        tiny_text_model(tok_), tok_, VisionSpec(image_size=SIZE, patch_size=16, hidden=32, layers=1, heads=2)
    )
    return model.eval(), processor


def test_pool_encodes_tasks_with_loss_on_the_answer_only(tiny):
    model, processor = tiny
    backbone = Backbone(model, processor, "tiny")
    samples = [task_sample(rng_for(0, "lm", i), k, SIZE) for i in range(3) for k in TASK_KINDS]
    pool = encode_pool(backbone, model, samples, SIZE, rows=2)
    tok_ = backbone.tokenizer
    for i, s in enumerate(samples):
        answer = pool.input_ids[i][pool.labels[i] != -100]
        assert tok_.decode(answer).startswith(s["answer"])  # the answer (then the end of the turn), nothing else
        slots = int((pool.input_ids[i] == backbone.image_token_id).sum())
        n_refs = s["system"].count(DEFINITION_SLOT)
        assert slots == 2 * n_refs + (backbone.num_image_tokens if s["image"] is not None else 0)
        assert int(pool.n_refs[i]) == n_refs
    loss = lm_loss(backbone, pool, torch.arange(len(samples)), word_embedding_norm(model, len(tok_)))
    assert torch.isfinite(loss)


def test_task_scores_count_what_they_claim():
    s = [{"answer": "B", "options": {"A": "sitting", "B": "jumping", "C": "waving"}, "sub": "action", "form": "words"}]
    assert score_choice(s * 3, ["B", "B.", "jumping"])["accuracy"] == pytest.approx(1 / 3)  # official: exact only
    assert score_choice(s * 3, ["B", "B.", "jumping"])["lenient_accuracy"] == 1.0
    o = [{"answer": "<ka> is jumping.", "key": "jumping", "sub": "action", "form": "visual"}]
    res = score_open(o * 2, ["<ka> is jumping.", "<ka> is sitting."])
    assert res["key_accuracy"] == 0.5 and res["bleu"] < 1.0
    caps = [{"present": ["<ka>", "<lo>"]}, {"present": []}]
    res = score_named_captions(caps, ["<ka> and a red cat in a park.", "<lo> in a park."])
    assert (res["recall"], res["precision"], res["names_said"]) == (0.5, 0.5, 2)
    assert score_named_captions(caps[1:], ["A cat."])["precision"] is None


def test_gate_task_checks_run_end_to_end(tiny):
    model, processor = tiny
    cfg = GateConfig(
        visual=6, choice=3, open=3, where=2, named_caption=2, facts=3, size=SIZE, checks=("visual", *TASK_KINDS)
    )
    res = run_gate(model, processor, cfg, progress=False)
    assert res["passed"] is None and "captions" not in res and "definition_recognition" not in res
    summary = res["summary"]
    for key in (
        "choice_accuracy",
        "open_bleu",
        "open_key_accuracy",
        "where_accuracy",
        "caption_name_recall",
        "facts_accuracy",
    ):
        assert 0 <= summary[key] <= 1, key
    assert summary["caption_name_precision"] is None or 0 <= summary["caption_name_precision"] <= 1
    by = res["visual_definition_recognition"]["by_names"]
    assert sum(v["n"] for v in by.values()) == 6 and set(by) <= {"1", "2"}
    assert res["choice"]["n"] == 3 and len(res["facts"]["examples"]) == 3
    with pytest.raises(McLlavaError, match="unknown gate check"):
        GateConfig(checks=("chioce",))


def test_lm_stage_trains_the_tasks_and_scores_them_held_out(tmp_path, monkeypatch):
    """A phase with task weights trains on them (pools with refs and letters) and logs a held-out curve per task;
    a pool drawn before task weights existed keeps its spec, so a work folder is not drawn again."""
    import json

    from safetensors.torch import save_file

    from mcllava.proving_base.build import BuildConfig, Phase, build
    from mcllava.proving_base.build import lm as lm_module
    from mcllava.proving_base.build.common import vision_model
    from mcllava.proving_base.build.lm import pool_spec

    monkeypatch.setattr(lm_module, "VAL_TASKS_N", 10)
    spec = VisionSpec(image_size=SIZE, patch_size=16, hidden=32, layers=1, heads=2)
    (tmp_path / "vision").mkdir()
    (tmp_path / "tokenizer").mkdir()
    save_file(vision_model(spec).state_dict(), tmp_path / "vision" / "tower.safetensors")
    cur = Curriculum(2, 0.5, (0, 0, 0, 0.5, 0.5, 0), tasks={k: 1.0 for k in TASK_KINDS})
    lm = LMStage(
        phases=(Phase("tasks", 2, cur),),
        pool=8,
        val_pool=4,
        val_read=4,
        batch_size=2,
        lora_rank=2,
        lora_alpha=2,
        eval_every=2,
        checkpoint_every=1,
    )
    cfg = BuildConfig(work=tmp_path, vision=spec, lm=lm, progress=False, text_model=lambda t: tiny_text_model(t))
    assert build(cfg, stages=("lm",))["lm"]["steps"] == 2
    log = [json.loads(x) for x in (tmp_path / "lm" / "log.jsonl").read_text().splitlines()]
    tasks = log[-1]["val_tasks"]
    assert set(tasks) == set(TASK_KINDS)
    assert all(0 <= v["token_accuracy"] <= 1 and v["answer_loss"] > 0 for v in tasks.values())
    assert "tasks" not in pool_spec(Curriculum(2, 0.5), 0, 1, 0)["curriculum"]
    assert pool_spec(cur, 0, 1, 0)["curriculum"]["tasks"]["choice"] == 1.0


def test_gate_cli_refuses_an_unknown_check(tmp_path):
    from typer.testing import CliRunner

    from mcllava.cli import app

    res = CliRunner().invoke(app, ["base", "gate", "--weights", str(tmp_path), "--checks", "choice,nope"])
    assert res.exit_code == 2 and "--checks takes some of" in res.output, res.output
