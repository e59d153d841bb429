"""Answers never contain a concept's soft tokens `<c_i>`, even where a tied head makes them outscore every word."""

from __future__ import annotations

from mcllava.assistant import PersonalAssistant
from mcllava.bank import ConceptBank
from mcllava.testing import make_bank, make_base, red_photo


def test_soft_tokens_are_never_generated(tmp_path, tokenizer_dir):
    base = make_base(tokenizer_dir, tmp_path / "base", tied=True)
    bank = ConceptBank.load(make_bank(base, tmp_path / "bank"))
    bank.input_rows[:, 1:] *= (
        100  # soft rows far longer than any word (yet within what a bank may hold): with a tied head they top the logits
    )
    assistant = PersonalAssistant.load(bank, base)
    soft = [s for cid in bank.concept_ids for s in assistant.tokens.strings(cid)[1:]]
    backbone, photo = assistant.backbone, red_photo()
    prompt = backbone.format_prompt("Describe this photo.", assistant.tokens.system_text())
    unguarded = backbone.generate(prompt, backbone.visual_tokens([photo]).features[0], max_new_tokens=8)
    assert any(s in unguarded for s in soft), unguarded  # the failure this guards against does happen
    for image in (photo, None):
        answer = assistant.answer(image, "Describe this photo.", visual_prompt=False, max_new_tokens=8)
        assert not any(s in answer for s in soft), answer
    assert set(assistant.tokens.soft_ids).isdisjoint(
        i for cid in bank.concept_ids for i in assistant.tokens.ids[cid][:1]
    )
