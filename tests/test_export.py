"""`mcllava export`: transformers alone loads the checkpoint and answers exactly as the assistant does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mcllava.assistant import PersonalAssistant
from mcllava.errors import McLlavaError
from mcllava.export import EXPORT_INFO, export
from mcllava.testing import make_bank, make_base, red_photo

CASES = [(True, "What is <ana> doing next to <bo>?"), (False, "Is <bo> a dog?")]
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["chatml-untied", "no-template-tied"])
def exported(request, tmp_path_factory, tokenizer_dir):
    """(bank, export folder) for a ChatML base with an untied head, and a tied base without any chat template."""
    root = tmp_path_factory.mktemp(request.param)
    base = make_base(tokenizer_dir, root / "base", tied=request.param.endswith("-tied"))
    if request.param.startswith("no-template"):
        (base / "chat_template.jinja").unlink(missing_ok=True)
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = base / name
            if path.exists():
                config = json.loads(path.read_text())
                config.pop("chat_template", None)
                path.write_text(json.dumps(config))
    bank = make_bank(base, root / "bank")
    return bank, export(bank, root / "export", str(base))


def _hf_answer(model, processor, image, question: str) -> tuple[list[int], str]:
    """Prompt ids and greedy answer from transformers alone, with no system message."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    return inputs["input_ids"][0].tolist(), processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_transformers_alone_answers_like_the_assistant(exported):
    bank, out = exported
    assistant = PersonalAssistant.load(bank, str(bank.parent / "base"))
    backbone = assistant.backbone
    model, processor = LlavaForConditionalGeneration.from_pretrained(out), AutoProcessor.from_pretrained(out)
    for with_image, question in CASES:
        image = red_photo() if with_image else None
        ids, text = _hf_answer(model, processor, image, question)
        prompt = backbone.format_prompt(question, assistant.tokens.system_text(), image=with_image)
        assert ids == backbone.encode(prompt).input_ids  # the same prompt, token for token
        assert text == assistant.answer(image, question, visual_prompt=False, max_new_tokens=NEW_TOKENS)


def test_export_holds_tokens_rows_and_default_system(exported):
    bank, out = exported
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # a serving engine running as another user can read it
    assert {f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()} == {0o666 & ~mask}
    assistant = PersonalAssistant.load(bank, str(bank.parent / "base"))
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    for cid in assistant.bank.concept_ids:
        strings = assistant.bank.token_strings(cid)
        assert processor.tokenizer.convert_tokens_to_ids(strings) == assistant.tokens.ids[cid]
    index = torch.tensor(assistant.tokens.all_ids)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[index], assistant.backbone.model.get_input_embeddings().weight[index])
    assert torch.equal(
        model.get_output_embeddings().weight[index], assistant.backbone.model.get_output_embeddings().weight[index]
    )
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], tokenize=False
    )
    assert assistant.tokens.system_text() in text
    own = processor.apply_chat_template(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        tokenize=False,
    )
    assert "Be brief." in own and "<bo_1>" not in own  # a caller's own system message replaces the default
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["concepts"] == {"bo": "Bo", "ana": "Ana"} and info["visual_prompt"] is False
    # what a client needs to write its own system text (a bank trained with --introduce relevant wants only some)
    assert info["introductions"] == {c: assistant.tokens.introduction(c) for c in ("bo", "ana")}
    assert info["trained_introduce"] == "all"


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    bank, _ = exported
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(McLlavaError, match="not empty"):
        export(bank, tmp_path / "taken", str(bank.parent / "base"))
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_cli_export_and_serve(exported, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from mcllava.cli import app

    bank, _ = exported
    result = CliRunner().invoke(app, ["export", str(bank), str(tmp_path / "out"), "--base", str(bank.parent / "base")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / EXPORT_INFO).exists()
    assert (
        CliRunner()
        .invoke(app, ["export", str(bank), str(tmp_path / "out"), "--base", str(bank.parent / "base")])
        .exit_code
        == 2
    )  # not empty now

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda server_app, **kw: served.update(app=server_app, **kw))
    result = CliRunner().invoke(
        app, ["serve", str(bank), "--port", "8123", "--api-key", "k", "--base", str(bank.parent / "base")]
    )
    assert result.exit_code == 0, result.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    client = TestClient(served["app"])
    assert (
        client.get("/v1/concepts").status_code == 401
        and client.get("/v1/concepts", headers={"X-API-Key": "k"}).status_code == 200
    )
