"""Readers for evaluation sets (our tests.jsonl, the MC-LLaVA release layout, the Yo'LLaVA layout), all
returning the same validated record dicts."""

from .mcllava import read_mcllava, split_options
from .readers import read_any, read_tests_jsonl
from .records import TASKS, concepts_in, recognition_question, validate_record
from .yollava import read_yollava

__all__ = [
    "TASKS",
    "concepts_in",
    "read_any",
    "read_mcllava",
    "read_tests_jsonl",
    "read_yollava",
    "recognition_question",
    "split_options",
    "validate_record",
]
