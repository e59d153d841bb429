"""Failing writes on real file systems, and banks from strangers: nothing is lost, no code runs.

test_bank.py simulates disk-full and read-only with monkeypatching; here a tiny tmpfs really fills up and is
really remounted read-only (skipped where mounting is not allowed). Bank loading is attacked with pickle
payloads and fuzzed manifests and tensor files: every refusal is a BankError, never another exception.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bank import assert_same, make_bank

from mcllava.bank import ConceptBank
from mcllava.errors import BankError, McLlavaError

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/disk (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def big_bank(seed=1) -> ConceptBank:
    """About 300 KB of rows: more than the tiny disk holds."""
    d, k = 1024, 16
    return make_bank(
        hidden_size=d,
        k=k,
        input_rows=torch.randn(2, k + 1, d),
        head_rows=torch.randn(2, k + 1, d),
        locator_refs={"bo": torch.randn(5, d)},
        seed=seed,
    )


def test_a_really_full_disk_keeps_the_old_bank(tiny_disk):
    old = make_bank(seed=0)
    old.save(tiny_disk / "bank")
    with pytest.raises(BankError, match="the disk is full.*previous bank there is unchanged"):
        big_bank().save(tiny_disk / "bank")
    assert_same(old, ConceptBank.load(tiny_disk / "bank"))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["bank"]


def test_a_really_read_only_mount_keeps_the_old_bank(tiny_disk):
    old = make_bank(seed=0)
    old.save(tiny_disk / "bank")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(BankError, match="read-only"):
        make_bank(seed=1).save(tiny_disk / "bank")
    assert_same(old, ConceptBank.load(tiny_disk / "bank"))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["bank"]


def test_a_training_checkpoint_on_a_full_disk_is_a_clear_error(tiny_disk):
    from mcllava.checkpoint import save_checkpoint

    p = torch.nn.Parameter(torch.zeros(40_000))  # 160 KB
    with pytest.raises(McLlavaError, match="could not write the training checkpoint .*the disk is full"):
        save_checkpoint(tiny_disk / "bank.ckpt", [p], torch.optim.AdamW([p]), {"epoch": 1})
    assert list(tiny_disk.iterdir()) == []  # no partial bank.ckpt.tmp


# ------------------------------------------------------------------------------------------ untrusted banks


def test_a_bank_is_json_and_safetensors_only(tmp_path):
    path = make_bank().save(tmp_path / "bank")
    assert sorted(p.name for p in path.iterdir()) == ["concepts.safetensors", "manifest.json"]
    json.loads((path / "manifest.json").read_text())
    raw = (path / "concepts.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # a safetensors file: a JSON header, then raw numbers
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = make_bank().save(tmp_path / "bank")

    def forbidden(*args, **kwargs):
        raise AssertionError("a bank load must not unpickle")

    for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    assert ConceptBank.load(path).concept_ids == ["bo", "ana"]


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["concepts.safetensors", "manifest.json"])
def test_pickle_payloads_are_refused_without_running(tmp_path, victim):
    path = make_bank().save(tmp_path / "bank")
    marker = tmp_path / "pwned"
    torch.save({"input_rows": Payload(marker)}, path / victim)  # a torch/pickle file where the bank expects another
    with pytest.raises(BankError, match="safetensors|JSON"):
        ConceptBank.load(path)
    assert not marker.exists()


def test_a_crafted_huge_tensor_header_is_refused(tmp_path):
    path = make_bank().save(tmp_path / "bank")
    header = json.dumps(
        {"input_rows": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4 * 10**18]}}
    ).encode()
    (path / "concepts.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(BankError, match="safetensors"):
        ConceptBank.load(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "format_version",
    "base_model",
    "base_config_hash",
    "tokenizer_len_before",
    "tokenizer_len_after",
    "concept_ids",
    "tokens",
    "k",
    "hidden_size",
    "tied_head",
    "locator_refs",
    "display",
    "recipe",
    "metrics",
]


@pytest.fixture(scope="module")
def good_bank(tmp_path_factory) -> Path:
    return make_bank().save(tmp_path_factory.mktemp("good") / "bank")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@settings(max_examples=150, **FUZZ)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON | st.just("<drop>"), min_size=1, max_size=3))
def test_fuzz_manifest_fields(good_bank, tmp_path, changes):
    path = _copy(good_bank, tmp_path / "fuzz")
    manifest = json.loads((good_bank / "manifest.json").read_text())
    for key, value in changes.items():
        manifest.pop(key) if value == "<drop>" else manifest.__setitem__(key, value)
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        bank = ConceptBank.load(path)
    except BankError as exc:
        assert str(path) in str(exc)
    else:  # accepted: then it is consistent with its tensors
        assert tuple(bank.input_rows.shape) == (len(bank.concept_ids), bank.k + 1, bank.hidden_size)


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_fuzz_tensor_file_bytes(good_bank, tmp_path, data):
    path = _copy(good_bank, tmp_path / "fuzz")
    raw = bytearray((good_bank / "concepts.safetensors").read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "header"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:  # a header that is well-formed JSON with hostile values
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON)
        text = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    (path / "concepts.safetensors").write_bytes(bytes(raw))
    try:
        ConceptBank.load(path)
    except BankError:
        pass


def test_a_bank_refuses_with_named_reasons(good_bank, tmp_path):
    """The refusals a user meets, each in words (the full list is in test_bank.py)."""
    cases = {
        "newer format": ({"format_version": 99}, "newer than this mcllava reads"),
        "wrong type": ({"k": "16"}, "field 'k' has the wrong type"),
        "bool as int": ({"hidden_size": True}, "field 'hidden_size' has the wrong type"),
    }
    for name, (change, words) in cases.items():
        path = _copy(good_bank, tmp_path / name.replace(" ", "-"))
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(BankError, match=words):
            ConceptBank.load(path)
    os.remove(_copy(good_bank, tmp_path / "gone") / "manifest.json")
    with pytest.raises(BankError, match="manifest.json is missing"):
        ConceptBank.load(tmp_path / "gone")
