"""Training recipes in one place: the MC-LLaVA paper's, and the ones measured on the two small offline bases.

A preset is a `TrainConfig`; keyword overrides replace any of its fields. Real LLaVA bases take `TrainConfig()`
(or `paper()`); docs/results.md has the figures behind the small bases' choices.
"""

from __future__ import annotations

from .train import TrainConfig
from .training_data import DataOptions


def paper(**overrides) -> TrainConfig:
    """The MC-LLaVA code's recipe: batch 1, 15 epochs, lr 1e-3, every embedding and head row in the optimizer."""
    return TrainConfig(**{"batch_size": 1, "epochs": 15, "lr": 1e-3, "recipe": "paper", **overrides})


def proving_ground(epochs: int = 10, seed: int = 0, **overrides) -> TrainConfig:
    """The recipe measured on the proving-ground base (`--base proving-ground` defaults to it).

    k = 6 soft tokens, one per token of a character's slot row (the base shows each character as six words);
    lr 1e-2, batch 8; answers in the short form the base was trained on ("Yes" / "No", no full stop); no
    text-only questions, whose loss dominated and cost held-out recognition; one caption answer per concept
    and epoch, written by the base from the concepts' descriptions (`captions.distil_captions`), so that the
    trained name rows (tied to the head) do not fill captions with names (docs/results.md, "The recipe, and what was tried and not kept").
    """
    settings = {
        "k": 6,
        "epochs": epochs,
        "lr": 1e-2,
        "batch_size": 8,
        "seed": seed,
        "cpu_bf16": True,
        "data": DataOptions(short_answers=True, text=False, yes_no=("Yes", "No"), captions=1),
    }
    return TrainConfig(**{**settings, **overrides})


def tiny(epochs: int = 60, seed: int = 0, **overrides) -> TrainConfig:
    """The recipe for the tiny shapes base of the tests (`mcllava.tiny`): k=4, lr 1e-2, batch 8, short answers.

    The tiny base only ever answered "Yes." / "No.", so it trains on short answers and no text-only questions.
    """
    settings = {
        "k": 4,
        "epochs": epochs,
        "lr": 1e-2,
        "batch_size": 8,
        "seed": seed,
        "data": DataOptions(short_answers=True, text=False),
    }
    return TrainConfig(**{**settings, **overrides})
