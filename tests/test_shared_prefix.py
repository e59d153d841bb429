"""The batch's shared prefix (chat template start + system text) runs once: same loss and gradients as the full batch."""

from __future__ import annotations

import torch

from mcllava.backbone import MIN_SHARED_PREFIX
from mcllava.tokens import add_concept_tokens, make_trainable
from mcllava.training_data import collate


def _batch(backbone, tokens):
    system = tokens.system_text()
    turns = [
        ("Is <bo> in this photo?", "Yes."),
        ("Is <ana> in this photo?", "No."),
        ("Describe <bo> and <ana>.", "<bo> sits beside <ana>."),
    ]
    encoded = [backbone.encode(backbone.format_prompt(q, system=system, image=True), a) for q, a in turns]
    batch = collate(encoded, [None] * len(turns), backbone.tokenizer.pad_token_id or 0)
    n_image = int((batch.input_ids[0] == backbone.image_token_id).sum())
    feats = torch.randn(len(turns), n_image, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    return batch, feats


def _loss_and_grads(backbone, params, batch, feats, shared: int):
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    hidden = backbone.hidden_states(backbone.embed(ids, feats), mask, shared)
    keep = labels[:, 1:] != -100
    logits = backbone.model.get_output_embeddings()(hidden[:, :-1][keep])
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep])
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), hidden.detach(), grads


def test_shared_prefix_is_the_same_forward_and_backward(tiny_backbone):
    backbone = tiny_backbone
    tokens = add_concept_tokens(backbone.model, backbone.tokenizer, ["bo", "ana"], k=3)
    params = make_trainable(backbone.model, tokens)
    batch, feats = _batch(backbone, tokens)
    p = backbone.shared_prefix_length(batch.input_ids, batch.attention_mask)
    assert p >= MIN_SHARED_PREFIX
    assert not (batch.input_ids[:, :p] == backbone.image_token_id).any()  # images differ per row: never shared
    assert (batch.input_ids[:, :p] == batch.input_ids[:1, :p]).all()
    assert (
        not (batch.input_ids[:, : p + 1] == batch.input_ids[:1, : p + 1]).all()
        or batch.input_ids[0, p] == backbone.image_token_id
    )
    full_loss, full_hidden, full_grads = _loss_and_grads(backbone, params, batch, feats, 0)
    loss, hidden, grads = _loss_and_grads(backbone, params, batch, feats, p)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(hidden[real], full_hidden[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full_grads)  # the concept rows do get gradient
    for g, fg in zip(grads, full_grads):
        torch.testing.assert_close(g, fg, rtol=1e-4, atol=1e-6)
    # and answer_loss takes the shortcut by itself
    torch.testing.assert_close(
        backbone.answer_loss(batch.input_ids, batch.attention_mask, batch.labels, feats).detach(),
        full_loss,
        rtol=1e-5,
        atol=1e-6,
    )


def test_no_shared_prefix_for_one_row_or_short_prefixes(tiny_backbone):
    backbone = tiny_backbone
    tokens = add_concept_tokens(backbone.model, backbone.tokenizer, ["bo", "ana"], k=3)
    batch, _ = _batch(backbone, tokens)
    assert backbone.shared_prefix_length(batch.input_ids[:1], batch.attention_mask[:1]) == 0
    other = batch.input_ids.clone()
    other[1, 3] = other[0, 3] + 1  # rows differ early: nothing worth sharing
    assert backbone.shared_prefix_length(other, batch.attention_mask) == 0
    padded = batch.attention_mask.clone()
    padded[2, :] = 0  # a padded position is never shared
    assert backbone.shared_prefix_length(batch.input_ids, padded) == 0


def test_generate_reuses_the_prompt_prefix_and_answers_the_same(tiny_backbone):
    """The second prompt with the same system text computes only its own part; greedy answers are unchanged."""
    backbone = tiny_backbone
    tokens = add_concept_tokens(backbone.model, backbone.tokenizer, [f"c{i}" for i in range(8)], k=3)
    system = tokens.system_text()
    n_image = int(
        sum(t == backbone.image_token_id for t in backbone.encode(backbone.format_prompt("x", system=system)).input_ids)
    )
    images = torch.randn(3, n_image, backbone.hidden_size, generator=torch.Generator().manual_seed(1))
    questions = ["Is <c1> in this photo?", "What is <c5> doing?", "Is <c1> in this photo?"]
    prompts = [backbone.format_prompt(q, system=system) for q in questions]

    backbone.prompt_cache.enabled = False
    plain = [backbone.generate(p, f, max_new_tokens=6) for p, f in zip(prompts, images)]
    assert backbone.prompt_cache.prefix is None

    backbone.prompt_cache.enabled = True
    seen = []  # sequence length of every forward of the language model
    hook = backbone.model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    cached = []
    for p, f in zip(prompts, images):
        seen.clear()
        cached.append(backbone.generate(p, f, max_new_tokens=6))
        full = len(backbone.encode(p).input_ids)
        prefilled = [n for n in seen if n > 1]  # the prompt's forward (the prefix's own prefill included)
        if p is prompts[0]:
            assert prefilled == [full]  # nothing to share yet
        else:  # the prefix runs once (at the second prompt), then each prompt computes only the rest
            assert prefilled[-1] == full - len(backbone.prompt_cache.prefix)
            assert len(prefilled) == (2 if p is prompts[1] else 1)
    hook.remove()
    assert cached == plain
    prefix = backbone.prompt_cache.prefix
    assert prefix is not None and len(prefix) >= backbone.prompt_cache.min_tokens  # learnt from the first two prompts
    system_ids = backbone.encode(backbone.format_prompt("", system=system)).input_ids
    assert len(prefix) <= system_ids.index(backbone.image_token_id)  # never past the first image placeholder

    # new rows for a concept (another bank): the old prefix no longer matches and is not used, a new one is learnt
    with torch.no_grad():
        backbone.model.get_input_embeddings().weight[tokens.ids["c0"]] += 1.0
    backbone.prompt_cache.enabled = False
    fresh = [backbone.generate(p, f, max_new_tokens=6) for p, f in zip(prompts[:2], images)]
    backbone.prompt_cache.enabled = True
    assert [backbone.generate(p, f, max_new_tokens=6) for p, f in zip(prompts[:2], images)] == fresh
    assert backbone.prompt_cache.prefix.shape == prefix.shape and not torch.equal(backbone.prompt_cache.prefix, prefix)
