"""The proving ground: a procedural multi-concept world rendered with Pillow/NumPy, with exact ground truth.

Characters are fixed combinations of named traits (`traits`), drawn as sprites (`render`), placed in scenes
(`scenes`), asked about (`questions`) and written out as concept folders and test sets (`make`) or as the
base model's training corpus (`corpus`). See docs/world.md.
"""

from .corpus import corpus_sample, corpus_samples, write_corpus
from .make import Concept, make_world, plan_concepts
from .scenes import SETTINGS, Actor, RenderedScene, SceneSpec, render_scene, sample_scene, sample_visible_scene
from .traits import Identity, describe, is_personal_half, make_lookalike, random_identity, trait_diff

__all__ = [
    "Actor",
    "Concept",
    "Identity",
    "RenderedScene",
    "SETTINGS",
    "SceneSpec",
    "corpus_sample",
    "corpus_samples",
    "describe",
    "is_personal_half",
    "make_lookalike",
    "make_world",
    "plan_concepts",
    "random_identity",
    "render_scene",
    "sample_scene",
    "sample_visible_scene",
    "trait_diff",
    "write_corpus",
]
