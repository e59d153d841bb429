"""The registry of base models that are not Hugging Face checkpoints (e.g. the proving ground's).

`Backbone.load` asks these first; a layer above the core registers itself here, so the core never imports it.
"""

from __future__ import annotations

from collections.abc import Callable

# (claims(name), load(name) -> (model, processor)) pairs, asked in order. The proving ground registers itself
# when `mcllava` is imported.
CUSTOM_BASES: list[tuple[Callable[[str], bool], Callable[[str], tuple]]] = []


def register_base(claims: Callable[[str], bool], load: Callable[[str], tuple]) -> None:
    """Make `Backbone.load(name)` call `load(name)` for every name that `claims(name)` accepts."""
    if (claims, load) not in CUSTOM_BASES:
        CUSTOM_BASES.append((claims, load))


def is_custom_base(name: str) -> bool:
    """Whether a registered non-Hugging-Face base (e.g. `proving-ground`) loads `name`."""
    return any(claims(str(name)) for claims, _ in CUSTOM_BASES)
