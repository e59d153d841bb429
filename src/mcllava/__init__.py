"""mcllava: personalise LLaVA-family vision-language models with several concepts at once (MC-LLaVA)."""

from . import proving_base  # registers the `proving-ground` base with `Backbone.load`
from .version import __version__

__all__ = ["__version__", "proving_base"]
