"""Load: 8 concurrent clients on loopback get no errors, the single-client answers, and flat memory.

Runs benchmarks/server_soak.py's `soak` with 50 mixed requests (MCLLAVA_LONG=1: 400).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from mcllava.testing import serving

pytestmark = pytest.mark.slow  # eight clients against a live server

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "server_soak.py"
REQUESTS = 400 if os.environ.get("MCLLAVA_LONG") == "1" else 50


def _soak_module():
    spec = importlib.util.spec_from_file_location("server_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eight_clients_get_the_single_client_answers_with_flat_memory(tmp_path, tokenizer_dir):
    soak = _soak_module()
    from mcllava.server import create_app
    from mcllava.testing import make_bank, make_base

    app = create_app(
        str(make_bank(make_base(tokenizer_dir, tmp_path / "base"), tmp_path / "bank")),
        api_key="k",
        base=str(tmp_path / "base"),
    )
    with serving(app) as url:
        report = soak.soak(url, REQUESTS, clients=8, headers={"X-API-Key": "k"})
    print(report)
    assert report["errors"] == 0, report["error_samples"]
    assert report["mismatches"] == 0
    memory = report["rss_mb"]  # after warm-up, then after each quarter of the run
    assert memory[-1] - memory[0] < 25 and memory[-1] - memory[2] < 10, memory  # bounded, levelling off
    assert list(app.state.server.images.folder.iterdir()) == []
