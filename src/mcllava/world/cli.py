"""`mcllava world make` and `mcllava world corpus` (a Typer sub-app the main CLI mounts as "world")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .corpus import write_corpus
from .make import make_world

world_app = typer.Typer(
    help="The proving ground: render a procedural multi-concept world with exact ground truth.",
    no_args_is_help=True,
)


@world_app.command("make")
def make(
    out: Path = typer.Argument(..., help="Output folder (created)."),
    seed: int = typer.Option(0, help="World seed; the same seed gives the same bytes."),
    concepts: int = typer.Option(4, min=1, help="Number of personal concepts."),
    train_images: int = typer.Option(10, min=1, help="Training images per concept (with exact masks)."),
    test_scenes: Optional[int] = typer.Option(None, min=1, help="Test scenes (default: max(30, 15 x concepts))."),
    distractors: int = typer.Option(2, min=0, help="Look-alike distractors per concept."),
    layout: Optional[str] = typer.Option(None, help="Also write the test set in another layout: 'mcllava'."),
    size: int = typer.Option(192, min=64, max=1024, help="Image size in pixels (square)."),
    negatives: Optional[int] = typer.Option(
        None, min=0, help="Generic images without concepts (default: max(10, 5 x concepts))."
    ),
) -> None:
    """Write concept folders, negatives, multi-concept images, test scenes, tests.jsonl and world.json."""
    if layout not in (None, "mcllava"):
        raise typer.BadParameter(
            f"unknown layout {layout!r}; the only extra layout is 'mcllava'", param_hint="--layout"
        )
    summary = make_world(
        out,
        seed=seed,
        concepts=concepts,
        train_images=train_images,
        test_scenes=test_scenes,
        distractors=distractors,
        layout=layout,
        size=size,
        negatives=negatives,
    )
    typer.echo(json.dumps(summary, indent=1))


@world_app.command("corpus")
def corpus(
    out: Path = typer.Argument(..., help="Output folder (created)."),
    seed: int = typer.Option(0, help="Corpus seed."),
    n: int = typer.Option(1000, min=1, help="Number of samples."),
    size: int = typer.Option(192, min=64, max=1024, help="Image size in pixels (square)."),
) -> None:
    """Write corpus.jsonl + images for training the proving-ground base model (base half only)."""
    typer.echo(json.dumps(write_corpus(out, seed=seed, n=n, size=size), indent=1))
