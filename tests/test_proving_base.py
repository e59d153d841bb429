"""Fast tests of the proving-ground pipeline on a toy configuration (2-layer LM from a config, 64 px images)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mcllava.errors import McLlavaError
from mcllava.proving_base import WEIGHTS, MissingWeightsError, load
from mcllava.proving_base.build import AlignStage, BuildConfig, LMStage, Phase, VisionStage, build
from mcllava.proving_base.data import MAX_ACTORS, PATCH_TRAITS, Curriculum, scene_pool
from mcllava.proving_base.model import VisionSpec, tiny_text_model
from mcllava.proving_base.tasks import lm_sample


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    work = tmp_path_factory.mktemp("pb")
    cfg = BuildConfig(
        work=work,
        vision=VisionSpec(image_size=64, patch_size=16, hidden=32, layers=1, heads=2),
        vision_stage=VisionStage(scenes=72, steps=2, batch_size=4),
        align=AlignStage(steps=2, batch_size=4, words=("category", "color"), tower_steps=2, tower_batch_size=4),
        lm=LMStage(
            phases=(Phase("read", 1, Curriculum(mix=(0, 1, 0, 0, 0, 0))), Phase("compare", 1, Curriculum(2, 0.5))),
            pool=16,
            val_pool=16,
            val_read=8,
            batch_size=4,
            lora_rank=4,
            lora_alpha=4,
            eval_every=2,
            checkpoint_every=1,
        ),
        progress=False,
        text_model=lambda tok: tiny_text_model(tok),
    )
    (work / "tokenizer").mkdir(exist_ok=True)
    res = build(cfg)
    return cfg, res


def test_data_is_labelled_and_balanced():
    pool = scene_pool(0, 4, size=64, grid=4)
    assert pool.labels.shape == (4, MAX_ACTORS, len(PATCH_TRAITS))
    assert (pool.owner >= -1).all() and pool.owner.shape == (4, 16)
    answers = [lm_sample(0, i, Curriculum(1, 0.0, (0, 0, 0, 1, 0, 0)), 64)["answer"] for i in range(40)]
    assert 10 <= answers.count("Yes") <= 30
    reading = [lm_sample(0, i, Curriculum(mix=(0, 1, 0, 0, 0, 0), questions=(1, 0, 0, 0)), 64) for i in range(12)]
    assert {s["kind"] for s in reading} == {"exists"}


def test_build_stages_and_resume(toy):
    cfg, res = toy
    for stage in ("vision", "align", "lm"):
        assert (cfg.work / stage / "done.json").exists()
    # the align stage tuned the tower (tower_steps > 0): the export carries that tower, not the vision stage's
    tuned, first = (load_file(cfg.work / d / "tower.safetensors") for d in ("align", "vision"))
    exported = load_file(cfg.work / "export" / "vision.safetensors")
    k = next(k for k in tuned if k.endswith("q_proj.weight"))
    assert not torch.equal(tuned[k], first[k])
    assert torch.equal(exported[f"vision_tower.{k}"], tuned[k].half())
    assert res["export"]["bytes"] > 0
    # a finished stage is skipped; an interrupted one resumes from its checkpoint
    (cfg.work / "lm" / "done.json").unlink()
    ckpt = torch.load(cfg.work / "lm" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2
    again = build(cfg, stages=("lm",))
    assert again["lm"]["steps"] == 2
    log = [json.loads(x) for x in (cfg.work / "lm" / "log.jsonl").read_text().splitlines()]
    assert "val" in log[-1] and "exists" in log[-1]["val"]  # the held-out reading check is always scored


def test_an_interrupted_align_stage_continues_to_the_same_weights(toy, tmp_path, monkeypatch):
    from mcllava.proving_base.build import align

    cfg, _ = toy
    runs = {}
    for run in ("whole", "interrupted"):
        work = tmp_path / run
        shutil.copytree(cfg.work / "vision", work / "vision")
        shutil.copytree(cfg.work / "tokenizer", work / "tokenizer")
        runs[run] = replace(cfg, work=work, align=replace(cfg.align, tower_steps=4))
    monkeypatch.setattr(align, "CHECKPOINT_EVERY", 1)
    build(runs["whole"], stages=("align",))
    calls, loss = [], align._align_loss

    def failing(pred, target):  # two calls a step of the tower part: the 7th is its third step
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return loss(pred, target)

    monkeypatch.setattr(align, "_align_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        build(runs["interrupted"], stages=("align",))
    assert torch.load(runs["interrupted"].work / "align" / "part2.pt", weights_only=False)["step"] == 2
    resumed_calls = []
    monkeypatch.setattr(align, "_align_loss", lambda pred, target: resumed_calls.append(1) or loss(pred, target))
    build(runs["interrupted"], stages=("align",))
    assert len(resumed_calls) == 2 * 2 + 1  # the tower part's last two steps and the final score, no more
    for name in ("projector", "tower"):
        whole, resumed = (load_file(runs[r].work / "align" / f"{name}.safetensors") for r in runs)
        assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole), name


def test_a_pool_drawn_for_other_phases_is_drawn_again(toy):
    """A run continued from another run's checkpoint must not score a held-out pool drawn for other phases (w13/w14
    reported 0.8 on the describe phase's one-definition, no-look-alike pool while the gate said 0.57)."""
    cfg, _ = toy
    path = cfg.work / "lm" / "pool_val.pt"
    saved = torch.load(path, weights_only=False)
    assert saved["spec"]["curriculum"]["lookalike"] == 0.5 and saved["spec"]["curriculum"]["max_definitions"] == 2
    stale = {**saved, "spec": {**saved["spec"], "curriculum": {**saved["spec"]["curriculum"], "lookalike": 0.0}}}
    torch.save(stale, path)
    (cfg.work / "lm" / "done.json").unlink()
    build(cfg, stages=("lm",))
    assert torch.load(path, weights_only=False)["spec"] == saved["spec"]


def test_a_build_continues_from_an_export(toy, tmp_path):
    """`work_from_weights` + `LMStage.init_from`: the LoRA starts as the export's delta (lr 0 keeps it exactly), the
    pools drawn by 2 processes equal those drawn by one, and `time_budget` ends the stage early, saying so."""
    from mcllava.proving_base.build import work_from_weights

    cfg, _ = toy
    export = cfg.work / "export"
    work = tmp_path / "continued"
    work_from_weights(export, work)
    (work / "tokenizer").mkdir()
    lm = replace(
        cfg.lm,
        phases=(Phase("look", 3, Curriculum(2, 0.5)),),
        init_from=str(export),
        workers=2,
        time_budget=0.0,
        lr_lora=0.0,
    )
    res = build(replace(cfg, work=work, lm=lm), stages=("lm",))["lm"]
    assert (res["steps"], res["planned_steps"]) == (1, 3)
    delta = load_file(export / "lm_delta.safetensors")
    trained = load_file(work / "lm" / "trainable.safetensors")
    assert len(trained) == len(delta)
    for k, v in delta.items():
        assert torch.equal(trained[f"model.language_model.{k}.default.weight"].half(), v)
    for name in ("val", "val_read"):  # drawn in parallel, the same samples (features differ: an fp16 tower)
        a, b = (torch.load(w / "lm" / f"pool_{name}.pt", weights_only=False) for w in (cfg.work, work))
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["answers"] == b["answers"]
    (work / "lm" / "done.json").unlink()
    (work / "lm" / "ckpt.pt").unlink()
    with pytest.raises(McLlavaError, match="rank 4 / alpha 4 LoRA; this build's LoRA is rank 8"):
        build(replace(cfg, work=work, lm=replace(lm, lora_rank=8)), stages=("lm",))


def test_both_questions_ask_about_two_names_and_a_no_shows_one_of_them():
    """`Curriculum.both`: "are <x> and <y> both in this photo?" is Yes only with both shown; a No always shows
    the other name, so that "either" is wrong; without it every question asks about one name."""
    from mcllava.proving_base.data import recognition_case, rng_for, visual_defined

    cur = Curriculum(2, 0.5, both=1.0)
    cases = [recognition_case(rng_for(0, "lm", i), cur) for i in range(60)]
    assert all(c.both and len(c.names) == 2 and c.asked == c.names for c in cases)
    for c in cases:
        shown = {name for _, role, name in c.actors if role == "concept"}
        assert shown == (set(c.names) if c.positive else set(c.names) - {c.names[c.target]})
    assert 15 <= sum(c.positive for c in cases) <= 45
    assert any(role == "distractor" for c in cases if not c.positive for _, role, _ in c.actors)  # look-alikes too
    s = visual_defined(rng_for(0, "lm", 1), 64, cur)
    assert s["question"].startswith("Are <") and s["question"].endswith("both in this photo?")
    # captions and a curriculum without `both` are unchanged
    assert visual_defined(rng_for(0, "lm", 1), 64, cur, caption=True)["kind"] == "visual_caption"
    plain = [recognition_case(rng_for(0, "lm", i), Curriculum(2, 0.5)) for i in range(20)]
    assert not any(c.both for c in plain) and all(c.asked == [c.names[c.target]] for c in plain)


def test_lookalike_negatives_name_the_traits_they_change():
    from mcllava.proving_base.build import EncodedPool, yes_no_report
    from mcllava.proving_base.data import GATE_DEFINITIONS, defined_recognition, rng_for
    from mcllava.world.traits import LOOKALIKE_TRAITS

    samples = [defined_recognition(rng_for(0, "lm", i), 64, GATE_DEFINITIONS) for i in range(40)]
    look = [s for s in samples if s["changed"]]
    assert look and all(s["answer"] == "No" and 1 <= len(s["changed"]) <= 2 for s in look)
    assert all(set(s["changed"]) <= set(LOOKALIKE_TRAITS) for s in look)
    assert any(s["answer"] == "No" and s["changed"] == () for s in samples)  # other negatives change nothing
    # the report splits look-alike negatives by the trait they change: here colour changes are caught, others not
    n = len(samples)
    pool = EncodedPool(
        torch.zeros(n, 1),
        torch.ones(n, 1),
        torch.zeros(n, 1),
        torch.zeros(n, 1, 1),
        torch.ones(n),
        ["defined"] * n,
        [s["answer"] for s in samples],
        changed=[s["changed"] for s in samples],
    )
    scores = torch.tensor(
        [
            1.0 if s["answer"] == "Yes" else (-1.0 if "color" in s["changed"] or not s["changed"] else 1.0)
            for s in samples
        ]
    )
    rep = yes_no_report(scores, pool)["defined"]
    by = rep["lookalike_recall_by_trait"]
    assert sum(v["n"] for v in by.values()) == sum(len(s["changed"]) for s in look)
    for t, v in by.items():
        caught = [("color" in s["changed"]) for s in look if t in s["changed"]]
        assert v["n"] == len(caught) and v["recall"] == pytest.approx(sum(caught) / len(caught))
    assert by["color"]["recall"] == 1.0
    expected = sum("color" in s["changed"] for s in look) / len(look)
    assert rep["lookalike_negative_recall"] == pytest.approx(expected)


def test_load_from_export(toy):
    cfg, _ = toy
    from transformers import LlavaForConditionalGeneration

    from mcllava.backbone import Backbone
    from mcllava.proving_base.build import tokenizer_for

    model, processor = load(cfg.work / "export", text_model=tiny_text_model(tokenizer_for(cfg)))
    assert isinstance(model, LlavaForConditionalGeneration)
    saved = load_file(cfg.work / "export" / "vision.safetensors")
    proj = model.model.multi_modal_projector.linear_1.weight
    assert torch.equal(proj, saved["multi_modal_projector.linear_1.weight"].float())
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # SmolLM2 ties them
    backbone = Backbone(model, processor, "toy")
    prompt = backbone.format_prompt("<dax> is a red cat. Is <dax> in this photo?")
    assert prompt.index("Is <dax>") < prompt.index("<image>")  # text before the image
    assert len(backbone.encode(prompt).input_ids) > backbone.num_image_tokens


def test_backbone_loads_an_exported_folder_by_path(toy, monkeypatch):
    """`Backbone.load(folder)` of a `base build` export goes through `proving_base.load(folder)` and keeps the path
    as the base's name (banks remember it); the real SmolLM2 is swapped for the toy text model."""
    import mcllava.proving_base.loader as pb
    from mcllava.backbone import Backbone
    from mcllava.proving_base.build import tokenizer_for

    cfg, _ = toy
    text_model = tiny_text_model(tokenizer_for(cfg))
    monkeypatch.setattr(pb, "load", lambda weights=None: load(weights, text_model=text_model))
    backbone = Backbone.load(cfg.work / "export")
    assert backbone.name == str(cfg.work / "export")
    saved = load_file(cfg.work / "export" / "vision.safetensors")
    assert torch.equal(
        backbone.model.model.multi_modal_projector.linear_1.weight,
        saved["multi_modal_projector.linear_1.weight"].float(),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_vision_stage_on_a_missing_gpu_says_so(tmp_path):
    cfg = BuildConfig(
        work=tmp_path,
        vision=VisionSpec(image_size=64, patch_size=16, hidden=32, layers=1, heads=2),
        vision_stage=replace(VisionStage.gpu(), scenes=72, steps=1),
        progress=False,
    )
    with pytest.raises(McLlavaError, match="no CUDA device"):
        build(cfg, stages=("vision",))
    assert not (tmp_path / "vision" / "done.json").exists()


def test_missing_weights_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="mcllava base build"):
        load(tmp_path)


@pytest.mark.slow  # loads SmolLM2 from its GGUF
@pytest.mark.skipif(not (WEIGHTS / "vision.safetensors").exists(), reason="proving-ground weights not committed")
def test_committed_weights_load_offline():
    from transformers import LlavaForConditionalGeneration

    model, processor = load()
    assert isinstance(model, LlavaForConditionalGeneration)
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size <= 60 * 2**20


def test_gate_runs_on_toy(toy):
    cfg, _ = toy
    from mcllava.proving_base.build import tokenizer_for
    from mcllava.proving_base.gate import GateConfig, run_gate

    model, processor = load(cfg.work / "export", text_model=tiny_text_model(tokenizer_for(cfg)))
    res = run_gate(
        model,
        processor,
        GateConfig(
            captions=2,
            generic=4,
            definitions=8,
            named=4,
            visual=4,
            both=6,
            size=64,
            checks=("definitions", "named", "visual", "both", "captions", "generic"),  # tasks: test_proving_base_tasks
        ),
        progress=False,
    )
    assert res["passed"] in (True, False)  # every gated check ran
    assert set(res["summary"]) >= {
        "caption_category_recall",
        "generic_accuracy",
        "definition_weighted_accuracy",
        "named_weighted_accuracy",
        "visual_definition_weighted_accuracy",
        "visual_both_weighted_accuracy",
    }
    assert 0 <= res["summary"]["definition_weighted_accuracy"] <= 1
    assert res["visual_both_recognition"]["n"] == 6 and 0 <= res["summary"]["visual_both_weighted_accuracy"] <= 1


def test_build_cli_refuses_a_bad_mix_or_phase_steps(tmp_path):
    from typer.testing import CliRunner

    from mcllava.cli import app
    from mcllava.proving_base.build import slots_phases

    for args, msg in (
        (["--mix", "describe=1,2,3"], "6 non-negative weights"),
        (["--mix", "nope=1,1,1,1,1,1"], "PHASE one of"),
        (["--phase-steps", "1,2"], "3 non-negative counts"),
        (["--layout", "rows"], "grid or slots"),
        (["--layout", "slots", "--phase-steps", "1,2,3"], f"{len(slots_phases())} non-negative counts"),
    ):
        res = CliRunner().invoke(app, ["base", "build", "--work", str(tmp_path), *args])
        assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "vision").exists()  # refused before any stage ran


def test_patch_word_targets_give_each_patch_one_word(toy):
    """The align stage's targets: one trait word per owned patch (cycled over the grid when several traits are
    asked for, all of them in any 2x2 block), at a word's norm; the background word at half norm elsewhere."""
    from mcllava.proving_base.build import BACKGROUND_NORM, tokenizer_for
    from mcllava.proving_base.build.align import patch_word_targets, patch_word_trait, trait_word_vectors, word_vectors
    from mcllava.proving_base.data import VALUES
    from mcllava.tokens import word_embedding_norm

    tok = tokenizer_for(toy[0])
    model = tiny_text_model(tok)
    words = ("category", "color", "pattern")
    which = patch_word_trait(4, len(words))
    assert set(which.view(4, 4)[:2, :2].reshape(-1).tolist()) == {0, 1, 2}
    assert torch.all(patch_word_trait(4, 1) == 0)
    labels = torch.full((1, MAX_ACTORS, len(PATCH_TRAITS)), -100)
    labels[0, 0] = torch.tensor(
        [
            VALUES[t].index(v)
            for t, v in zip(
                PATCH_TRAITS, ("dog", "red", "striped", "round", "round", "close-set", "slim", "hat", "blue")
            )
        ]
    )
    owner = torch.full((1, 16), -1)
    owner[0, :8] = 0
    norm = word_embedding_norm(model, len(tok))
    bg = word_vectors(model, tok, ["grass"])[0] * BACKGROUND_NORM
    want = {"category": "dog", "color": "red", "pattern": "striped"}
    for asked in (words, ("category",)):
        tgt = patch_word_targets(model, tok, labels, owner, asked, "grass")
        assert tgt.shape == (1, 16, model.get_input_embeddings().weight.shape[1])
        assert torch.allclose(tgt[0, 8:], bg.expand(8, -1))
        which = patch_word_trait(4, len(asked))
        for p in range(8):
            trait = asked[int(which[p])]
            assert torch.allclose(tgt[0, p], trait_word_vectors(model, tok, trait)[VALUES[trait].index(want[trait])])
            assert abs(tgt[0, p].norm().item() - norm) < 1e-3 * norm
    # superposed: every owned patch is the sum of both words, at a word's norm
    tgt = patch_word_targets(model, tok, labels, owner, ("category+color",), "grass")
    both = (
        trait_word_vectors(model, tok, "category")[VALUES["category"].index("dog")]
        + trait_word_vectors(model, tok, "color")[VALUES["color"].index("red")]
    )
    assert torch.allclose(tgt[0, :8], (both / both.norm() * norm).expand(8, -1), atol=1e-5)
    assert torch.allclose(tgt[0, 8:], bg.expand(8, -1))


def test_lm_phases_and_schedule():
    st = LMStage(phases=(Phase("read", 10, Curriculum()), Phase("compare", 10, Curriculum())), warmup=2, decay=0.5)
    assert st.steps == 20 and [st.phase_at(s) for s in (0, 9, 10, 19)] == [0, 0, 1, 1]
    # warm-up, then flat until the last half, then a cosine to ~0
    assert st.lr_factor(0) == 0.5 and st.lr_factor(5) == st.lr_factor(10) == 1.0
    assert 0 < st.lr_factor(19) < 0.05 and st.lr_factor(12) > st.lr_factor(15) > st.lr_factor(18)


def test_token_capacity_ceiling_counts_what_the_tokens_show():
    """benchmarks/token_capacity.py: a look-alike counts as caught only when a changed trait is on its patches."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "token_capacity.py"
    spec = importlib.util.spec_from_file_location("token_capacity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    owned = [{"category", "color"}, {"category"}, set(), {"pattern"}]
    changes = [{"color"}, {"ears"}, {"color"}, {"pattern", "eyes"}]
    res = module.ceiling(owned, changes)
    assert res["owns_a_patch"] == 0.75 and res["lookalikes_shown"] == 0.5
    # positives 0.75; negatives: half ordinary (right), half look-alikes: 0.5 shown + 0.25 with nothing to see
    assert res["weighted_ceiling"] == pytest.approx((0.75 + 0.5 + 0.5 * 0.75) / 2)
    everything = module.ceiling([{"color", "ears", "pattern", "eyes"}] * 4, changes)
    assert everything["weighted_ceiling"] == 1.0


def test_proving_ground_recipe_is_what_personalize_uses(tmp_path, monkeypatch):
    """`personalize --base proving-ground` trains with the base's recipe (k = one slot row, short bare answers),
    and explicit options still win."""
    from typer.testing import CliRunner

    import mcllava.cli
    from mcllava.cli import app
    from mcllava.presets import proving_ground

    seen = {}

    def fake_run(concept_set, backbone, out, config, **kw):
        seen["config"] = config
        raise McLlavaError("stop here")

    monkeypatch.setattr(mcllava.cli, "personalize_concepts", fake_run)
    monkeypatch.setattr(
        "mcllava.backbone.Backbone.load", classmethod(lambda cls, base, **kw: SimpleNamespace(tokenizer=None))
    )
    monkeypatch.setattr("mcllava.concepts.ConceptSet.load", classmethod(lambda cls, d, **kw: []))
    for args, k, lr, captions, text in (
        ([], 6, 1e-2, 1, (False, None)),
        (["--k", "3", "--lr", "0.5", "--captions", "0", "--text", "2", "--open-answers", "3"], 3, 0.5, 0, (True, 2)),
    ):
        res = CliRunner().invoke(
            app, ["personalize", str(tmp_path), "--base", "proving-ground", "--out", str(tmp_path / "b"), *args]
        )
        assert res.exit_code != 0 and "stop here" in res.output, res.output
        cfg = seen["config"]
        assert (cfg.k, cfg.lr, cfg.data.yes_no, cfg.data.short_answers, cfg.data.captions) == (
            k,
            lr,
            ("Yes", "No"),
            True,
            captions,
        )
        assert (cfg.data.text, cfg.data.text_per_concept) == text
        assert cfg.data.open_answers == (3 if args else 0)
    assert proving_ground().data.text is False
