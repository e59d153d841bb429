"""Fuzzing the user's files: concept folders (images, masks, names, concept.yaml) and evaluation sets.

Each generated input either loads into something consistent or is refused with ConceptError / ValueError
that names the offending file; never another exception, a hang, or a file read outside the folder given.
test_concepts.py fuzzes single image bytes and concept.yaml text; here whole folders and the readers.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mcllava.concepts import ConceptSet, ImageLimits, load_image
from mcllava.datasets import read_mcllava, read_tests_jsonl, read_yollava
from mcllava.errors import ConceptError

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIMITS = ImageLimits(max_pixels=200_000, max_bytes=200_000)
MODES = {
    "RGB": (200, 30, 30),
    "RGBA": (255, 0, 0, 128),
    "LA": (90, 200),
    "L": 128,
    "1": 1,
    "P": 3,
    "I;16": 40000,
    "CMYK": (0, 255, 255, 0),
}


def _png_claiming(width: int, height: int) -> bytes:
    """Signature and IHDR only: a decompression bomb's header."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _bmp_claiming(width: int, height: int) -> bytes:
    """A BMP header declaring a huge 24-bit image with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@st.composite
def image_bytes(draw) -> tuple[bytes, tuple[int, int] | None]:
    """(file bytes, size if it is a valid image) of many kinds: odd modes, tiny, truncated, bombs, garbage."""
    kind = draw(st.sampled_from(["good", "good", "good", "truncated", "bomb", "bmp-bomb", "empty", "garbage", "gif"]))
    if kind == "bomb":
        return _png_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))), None
    if kind == "bmp-bomb":
        return _bmp_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(-(2**31) + 1, 2**31 - 1))), None
    if kind == "empty":
        return b"", None
    if kind == "garbage":
        return draw(st.binary(max_size=64)), None
    mode = draw(st.sampled_from(sorted(MODES)))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    fmt = (
        "JPEG"
        if mode == "CMYK"
        else draw(st.sampled_from(["PNG", "BMP", "WEBP"] if mode in ("RGB", "RGBA", "L", "P", "1") else ["PNG"]))
    )
    if kind == "gif":
        fmt, mode = "GIF", "P"
    im = Image.new(mode, size, MODES[mode])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "truncated":
        cut = data[: draw(st.integers(0, len(data) - 1))]
        return cut, _complete_size(cut)
    return data, size


def _complete_size(data: bytes) -> tuple[int, int] | None:
    """The size of `data` if Pillow still decodes all of it (a cut inside a PNG's IEND or a GIF's trailer loses
    nothing), else None: such a cut is a valid image, and the server is right to accept it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size
    except Exception:
        return None


@st.composite
def concept_folder(draw) -> dict:
    """A description of a concept folder: {id: {"yaml": text|None, "files": {name: bytes}}}, plus _multi."""
    ids = draw(
        st.lists(
            st.sampled_from(["bo", "ana", "Bo", "bo_1", "9x", "a b", "...", "über", "x" * 40, "_hidden"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    folder = {}
    for cid in ids:
        files = {}
        for i in range(draw(st.integers(0, 3))):
            data, size = draw(image_bytes())
            name = draw(st.sampled_from([f"{i}.png", f"{i}.jpg", f"{i}.txt", f"..{i}.png", f"{i}.PNG", f"{i}.webp"]))
            files[name] = data
            if draw(st.booleans()):  # a mask: right size, wrong size, blank or garbage
                w, h = size or (8, 8)
                which = draw(st.sampled_from(["ok", "wrong-size", "blank", "garbage", "jpeg"]))
                m = Image.new("L", (w + (which == "wrong-size"), h), 0 if which == "blank" else 255)
                buf = io.BytesIO()
                m.save(buf, format="JPEG" if which == "jpeg" else "PNG")
                stem = Path(name).stem
                files[f"{stem}_mask.{'jpg' if which == 'jpeg' else 'png'}"] = (
                    b"\0\1" if which == "garbage" else buf.getvalue()
                )
        yaml_text = draw(
            st.none()
            | st.sampled_from(
                [
                    "name: Bo\n",
                    "facts: [1, 2]\n",
                    "name: [\n",
                    "{a: 1}\n",
                    "!!python/object/apply:os.system ['true']\n",
                    "x: &a [*a]\n",
                ]
            )
        )
        folder[cid] = {"yaml": yaml_text, "files": files}
    return folder


def _write_folder(root: Path, spec: dict) -> None:
    for cid, c in spec.items():
        train = root / cid / "train"
        train.mkdir(parents=True)
        if c["yaml"] is not None:
            (root / cid / "concept.yaml").write_text(c["yaml"])
        for name, data in c["files"].items():
            (train / name).write_bytes(data)


@settings(max_examples=60, **FUZZ)
@given(spec=concept_folder())
def test_fuzz_concept_folders(tmp_path_factory, spec):
    root = tmp_path_factory.mktemp("c")
    _write_folder(root, spec)
    try:
        cs = ConceptSet.load(root, limits=LIMITS)
    except ConceptError as exc:
        assert exc.problems and all(p.startswith(str(root)) for p in exc.problems), exc.problems
    else:
        for concept in cs:
            for item in concept.images:
                image, mask = item.load(LIMITS)
                assert image.mode == "RGB" and (mask is None or mask.shape == image.size[::-1])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_odd_mode_loads_as_rgb_with_its_mask(tmp_path, mode):
    train = tmp_path / "bo" / "train"
    train.mkdir(parents=True)
    Image.new(mode, (12, 10), MODES[mode]).save(train / ("0.jpg" if mode == "CMYK" else "0.png"))
    mask = np.zeros((10, 12), np.uint16 if mode == "I;16" else np.uint8)
    mask[2:5, 3:7] = np.iinfo(mask.dtype).max  # a 16-bit mask too for the 16-bit photo
    Image.fromarray(mask).save(train / "0_mask.png")
    image, loaded = ConceptSet.load(tmp_path)["bo"].images[0].load()
    assert image.mode == "RGB" and image.size == (12, 10) and loaded.sum() == 12


@pytest.mark.parametrize(
    "header", [_png_claiming(100_000, 100_000), _png_claiming(2**31 - 1, 1), _bmp_claiming(60_000, -60_000)]
)
def test_decompression_bombs_are_refused_before_decoding(tmp_path, header):
    path = tmp_path / "bomb.png"
    path.write_bytes(header)
    with pytest.raises(ConceptError, match="too many pixels|cannot read"):
        load_image(path)


def test_special_files_and_links_out_of_the_folder(tmp_path):
    """A FIFO would block a reader forever; a link may point anywhere: neither hangs nor leaks a file's text."""
    train = tmp_path / "c" / "bo" / "train"
    train.mkdir(parents=True)
    os.mkfifo(train / "0.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    (train / "1.png").symlink_to(secret)
    (train / "2.png").symlink_to("/dev/zero")
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(pytest.raises(ConceptError, ConceptSet.load, tmp_path / "c")), daemon=True
    )
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "loading a concept folder with a FIFO hung"
    problems = result[0].value.problems  # the FIFO and the device are not regular files: never opened, not listed
    assert len(problems) == 1 and "1.png: cannot read image" in problems[0] and "the secret" not in problems[0]


# ------------------------------------------------------------------------------------------------- readers

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
GOOD = {
    "image": "a.png",
    "task": "recognition",
    "question": "Is <bo> in this photo?",
    "answer": "Yes",
    "concepts": ["bo"],
    "present": ["bo"],
    "boxes": {"bo": [1, 2, 30, 40]},
}
KEYS = ["image", "task", "question", "answer", "options", "concepts", "present", "boxes"]
HOSTILE_LINES = [
    "[" * 50_000,
    "{" * 50_000,
    '{"a": ' + "9" * 5000 + "}",
    '{"image": "../../../etc/hostname", "task": "vqa", "question": "q", "answer": "a"}',
    '{"image": "a\\u0000.png", "task": "vqa", "question": "q", "answer": "a"}',
    "NaN",
    '{"task": "grounding", "image": "a.png", "question": "q", "answer": "a", "boxes": {"bo": [NaN, 0, 1, Infinity]}}',
]


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


def _check_records(records: list[dict]) -> None:
    for r in records:
        assert r["image"] is None or Path(r["image"]).is_absolute()
        for box in r["boxes"].values():
            assert all(np.isfinite(box)), box


@settings(max_examples=150, **FUZZ)
@given(
    changes=st.lists(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=3), min_size=1, max_size=3),
    extra=st.sampled_from([None, *HOSTILE_LINES]),
)
def test_fuzz_tests_jsonl(tmp_path_factory, changes, extra):
    root = tmp_path_factory.mktemp("t")
    _png(root / "a.png")
    lines = ([extra] if extra else []) + [json.dumps({**GOOD, **c}) for c in changes]
    (root / "tests.jsonl").write_text("\n".join(lines) + "\n")
    try:
        _check_records(read_tests_jsonl(root / "tests.jsonl"))
    except ValueError as exc:
        assert str(root / "tests.jsonl") in str(exc)


@settings(max_examples=120, **FUZZ)
@given(
    which=st.sampled_from(["choice.json", "vqa.json", "qa.json", "position.json"]),
    where=st.sampled_from(["concept/test/Alex", "multi/Alex_Gloria"]),
    content=JSON
    | st.dictionaries(
        st.sampled_from(["0.png", "1.png", "../0.png", "/etc/passwd"]),
        JSON | st.fixed_dictionaries({"Human": JSON, "AI": JSON}),
        max_size=3,
    )
    | st.sampled_from(HOSTILE_LINES),
)
def test_fuzz_mcllava_layout(tmp_path_factory, which, where, content):
    root = tmp_path_factory.mktemp("m")
    for folder in ("concept/test/Alex", "concept/test/Gloria", "multi/Alex_Gloria"):
        for k in range(2):
            _png(root / folder / f"{k}.png")
    (root / where / which).write_text(content if isinstance(content, str) else json.dumps(content))
    try:
        _check_records(read_mcllava(root))
    except ValueError as exc:
        assert str(root) in str(exc)


@settings(max_examples=80, **FUZZ)
@given(
    content=JSON
    | st.dictionaries(
        st.sampled_from(["bo", "zz"]),
        st.dictionaries(
            st.sampled_from(["0.png", "../../x.png"]),
            JSON | st.fixed_dictionaries({"question": JSON, "options": JSON, "correct_answer": JSON}),
            max_size=2,
        ),
        max_size=2,
    )
    | st.sampled_from(HOSTILE_LINES)
)
def test_fuzz_yollava_layout(tmp_path_factory, content):
    root = tmp_path_factory.mktemp("y")
    for name in ("bo", "mam"):
        _png(root / "test" / name / "0.png")
    (root / "yollava-visual-qa.json").write_text(content if isinstance(content, str) else json.dumps(content))
    try:
        _check_records(read_yollava(root))
    except ValueError as exc:
        assert str(root) in str(exc)
