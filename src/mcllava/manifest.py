"""A concept bank's ``manifest.json``: read and checked whole on load, so that whatever reads a field later
(`mcllava info`, the server, the assistant) finds it of the right type, and a bad one is refused in words that
name it. Also where a bank's base model may be named from: a hub id or `proving-ground`, never a local path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import BankError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
PROVING_GROUND = "proving-ground"  # the committed offline base (backbone.PROVING_GROUND)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
DISPLAY_TEXTS = ("name", "category", "description", "thumbnail")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The checked manifest of the bank folder `folder`, as `ConceptBank`'s keyword arguments plus
    ``locator_counts``; :class:`BankError` naming the field for anything wrong."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise BankError(f"bank {folder} is incomplete: {MANIFEST} is missing")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BankError(f"bank {folder}: {MANIFEST} is too large to be a manifest")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BankError(f"bank {folder}: {MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BankError(f"bank {folder}: {MANIFEST} must hold a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BankError(f"bank {folder}: {MANIFEST} has no valid format_version")
    if version > FORMAT_VERSION:
        raise BankError(
            f"bank {folder} has format version {version}, newer than this mcllava reads ({FORMAT_VERSION}); "
            "upgrade mcllava to load it"
        )
    return _manifest_fields(manifest, mpath)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _manifest_problem(fields: dict[str, Any]) -> str | None:
    """What is wrong with the manifest's free-form parts (base_model, display, recipe, metrics), or None.

    They are read later by `mcllava info`, the server and the assistant, so a wrong type there must be refused
    here, in words naming the field, rather than fail as a traceback in whatever reads it first.
    """
    if not fields["base_model"].strip():
        return "field 'base_model' is empty"
    for cid, info in fields["display"].items():
        if not isinstance(info, dict):
            return f"display.{cid} must be an object, not {type(info).__name__}"
        for key in DISPLAY_TEXTS:
            if info.get(key) is not None and not isinstance(info[key], str):
                return f"display.{cid}.{key} must be a string, not {type(info[key]).__name__}"
        if info.get("facts") is not None and not (
            isinstance(info["facts"], list) and all(isinstance(f, dict) for f in info["facts"])
        ):
            return f"display.{cid}.facts must be a list of objects"
    introduce = fields["recipe"].get("introduce")
    if introduce is not None and introduce not in ("all", "relevant"):
        return f"recipe.introduce must be 'all' or 'relevant', not {introduce!r}"[:300]
    history = fields["metrics"].get("history")
    if history is None:
        return None
    if not isinstance(history, list):
        return f"metrics.history must be a list of epochs, not {type(history).__name__}"
    for i, entry in enumerate(history):
        where = f"metrics.history[{i}]"
        if not isinstance(entry, dict):
            return f"{where} must be an object, not {type(entry).__name__}"
        if not isinstance(entry.get("epoch"), int) or isinstance(entry.get("epoch"), bool) or entry["epoch"] < 0:
            return f"{where}.epoch must be a non-negative integer"
        if not _is_number(entry.get("loss")):
            return f"{where}.loss must be a number"
        probe = entry.get("probe")
        if probe is not None and not (isinstance(probe, dict) and all(_is_number(v) for v in probe.values())):
            return f"{where}.probe must map names to numbers"
    return None


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face hub id (``org/model`` or ``model``), not as a path."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def token_strings(cid: str, k: int) -> list[str]:
    return [f"<{cid}>"] + [f"<{cid}_{j}>" for j in range(1, k + 1)]


def _manifest_fields(manifest: dict[str, Any], mpath: Path) -> dict[str, Any]:
    """Type-check the manifest's fields; return the constructor's keyword arguments."""

    def get(key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in manifest:
            if default is ...:
                raise BankError(f"{mpath}: required field {key!r} is missing")
            return default
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BankError(f"{mpath}: field {key!r} has the wrong type ({type(value).__name__})")
        return value

    ids = get("concept_ids", list)
    if not all(isinstance(c, str) for c in ids):
        raise BankError(f"{mpath}: concept_ids must be strings")
    fields = {
        "base_model": get("base_model", str),
        "base_config_hash": get("base_config_hash", str),
        "tokenizer_len_before": get("tokenizer_len_before", int),
        "concept_ids": ids,
        "k": get("k", int),
        "hidden_size": get("hidden_size", int),
        "tied_head": get("tied_head", bool),
        "display": get("display", dict, {}),
        "recipe": get("recipe", dict, {}),
        "metrics": get("metrics", dict, {}),
        "locator_counts": get("locator_refs", dict, {}),
    }
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields["locator_counts"].values()):
        raise BankError(f"{mpath}: locator_refs must map concept ids to row counts")
    after = get("tokenizer_len_after", int, None)
    if after is not None and after != fields["tokenizer_len_before"] + len(ids) * (fields["k"] + 1):
        raise BankError(f"{mpath}: tokenizer_len_after ({after}) does not match the concept and k counts")
    tokens = get("tokens", dict, None)
    if tokens is not None and tokens != {c: token_strings(c, fields["k"]) for c in ids}:
        raise BankError(f"{mpath}: 'tokens' does not match concept_ids and k")
    problem = _manifest_problem(fields)
    if problem:
        raise BankError(f"{mpath}: {problem}")
    return fields
