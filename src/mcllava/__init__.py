"""mcllava: personalise LLaVA-family vision-language models with several concepts at once (MC-LLaVA)."""

__version__ = "0.1.0"
