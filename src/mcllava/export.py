"""Export a personalised model as a plain Hugging Face checkpoint that needs no mcllava to run.

The concept tokens become ordinary added tokens of the tokenizer, their rows are written into the (resized)
input embeddings and LM head, and the chat template gains the concept introductions as its default system
text: a conversation without a system message is rendered exactly as `PersonalAssistant` renders it with
``visual_prompt=False``. Engines that load HF LLaVA checkpoints (vLLM, SGLang, TGI, `transformers`) can then
serve the personalised model as is. The Set-of-Mark visual prompt needs the locator and is not exported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from .assistant import PersonalAssistant
from .backbone import Backbone
from .bank import ConceptBank
from .bases import is_custom_base
from .errors import McLlavaError
from .files import permissions_of_new_files
from .version import __version__

EXPORT_INFO = "mcllava-export.json"

# The LLaVA-1.5 conversation format of `backbone.FALLBACK_FORMAT`, as a chat template, for processors that
# carry none: "{system}\nUSER: <image>\n{question} ASSISTANT:" (the system line only when there is one).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def with_default_system(template: str | None, system: str) -> str:
    """`template` (or the LLaVA-1.5 fallback) with `system` as the system message when none is given.

    The system message is prepended in the same shape `Backbone.format_prompt` builds (a list with one text
    part), so the rendered prompt is identical to mcllava's. Concept ids are letters, digits, `_` and `-`, so
    the text is a safe Jinja string literal once JSON-quoted.
    """
    literal = json.dumps(system)
    head = (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': [{{'type': 'text', 'text': {literal}}}]}}] + messages %}}"
        "{% endif %}"
    )
    return head + (template or FALLBACK_TEMPLATE)


def _checkpoint_dtype(name: str) -> torch.dtype | None:
    """The dtype a local or hub checkpoint was saved in (None: let the loader decide), so exports keep their size."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def export(bank_path: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Write base model + concept bank as a standard HF checkpoint folder at `out_dir`; return its path.

    `base` overrides the base model the bank remembers (it must be the same model). The folder is written
    beside `out_dir` first and renamed into place, so a failed export leaves nothing half-written; an
    existing non-empty `out_dir` is refused.
    """
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise McLlavaError(f"cannot export to {out}: it exists and is not empty")
    bank = ConceptBank.load(bank_path)
    name = bank.base_to_load(base)
    dtype = None if is_custom_base(name) else _checkpoint_dtype(name)
    assistant = PersonalAssistant(Backbone.load(name, dtype=dtype, device="cpu"), bank)
    model, processor, tokenizer = assistant.backbone.model, assistant.backbone.processor, assistant.backbone.tokenizer

    system = assistant.tokens.system_text()
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    template = with_default_system(template, system)
    processor.chat_template = template
    tokenizer.chat_template = template
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # soft tokens <c_i> are never an answer (mcllava suppresses them); engines that read generation_config do too
    model.generation_config.suppress_tokens = list(assistant.tokens.soft_ids)
    model.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "mcllava_version": __version__,
            "concepts": {cid: assistant.names[cid] for cid in bank.concept_ids},
            "k": bank.k,
            "base_config_hash": bank.base_config_hash,
            "default_system": system,
            "suppress_tokens": list(assistant.tokens.soft_ids),  # for engines that ignore generation_config
            "visual_prompt": False,
            # a bank trained with `--introduce relevant` expects only the concepts a question needs in the system
            # text; an engine gets the default (every concept) unless the client writes its own system message
            "introductions": {cid: assistant.tokens.introduction(cid) for cid in bank.concept_ids},
            "trained_introduce": bank.recipe.get("introduce", "all"),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        permissions_of_new_files(tmp)  # for a serving engine running as another user
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
