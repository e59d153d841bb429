"""Concept folders: a good folder loads; every bad input is a ConceptError naming the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mcllava.concepts import (
    ConceptSet,
    ImageLimits,
    load_image,
    load_mask,
    validate_concept_id,
)
from mcllava.errors import ConceptError, McLlavaError


def img(path: Path, size=(16, 12), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def mask(path: Path, size=(16, 12)) -> Path:
    a = np.zeros(size[::-1], dtype=np.uint8)
    a[2:6, 3:9] = 255
    Image.fromarray(a, "L").save(path)
    return path


def make_concept(root: Path, cid: str, n: int = 2, yaml_text: str | None = None) -> Path:
    (root / cid / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img(root / cid / "train" / f"{i}.png")
    if yaml_text is not None:
        (root / cid / "concept.yaml").write_text(yaml_text)
    return root / cid


def load_error(root: Path, **kw) -> ConceptError:
    with pytest.raises(ConceptError) as info:
        ConceptSet.load(root, **kw)
    return info.value


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return dict(self.vocab)


def test_good_folder_loads(tmp_path):
    make_concept(
        tmp_path, "bo", n=0, yaml_text="name: Bo\ncategory: dog\nfacts:\n  - {question: 'Age?', answer: '3'}\n"
    )
    for name in ("10.png", "2.jpg", "1.webp"):
        img(tmp_path / "bo" / "train" / name)
    mask(tmp_path / "bo" / "train" / "2_mask.png")
    make_concept(tmp_path, "ana")
    for name in ("0.png", "1.png"):
        img(tmp_path / "_multi" / "bo+ana" / name)
    img(tmp_path / "_ignored" / "x.png")
    (tmp_path / ".hidden").mkdir()

    cs = ConceptSet.load(tmp_path, tokenizer=FakeTokenizer(["<s>", "hello"]))
    assert cs.ids == ["ana", "bo"] and len(cs) == 2 and "bo" in cs and "cy" not in cs
    bo = cs["bo"]
    assert [p.path.name for p in bo.images] == ["1.webp", "2.jpg", "10.png"]  # natural order
    assert bo.images[1].mask_path.name == "2_mask.png" and bo.images[0].mask_path is None
    assert (bo.name, bo.category, bo.token) == ("Bo", "dog", "<bo>")
    assert bo.facts == [{"question": "Age?", "answer": "3"}]
    assert cs["ana"].name == "ana" and cs["ana"].facts == []
    assert [(m.path.name, m.present) for m in cs.multi] == [("0.png", ["ana", "bo"]), ("1.png", ["ana", "bo"])]
    image, m = bo.images[1].load()
    assert image.mode == "RGB" and m.shape == (12, 16) and m.dtype == bool and m.sum() == 24
    assert [c.id for c in cs] == cs.ids
    with pytest.raises(KeyError):
        cs["cy"]


def test_all_problems_reported_together(tmp_path):
    make_concept(tmp_path, "9lives")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    err = load_error(tmp_path)
    assert len(err.problems) == 2 and "2 problems" in str(err)
    assert "9lives" in str(err) and str(tmp_path / "empty" / "train") in str(err)
    assert isinstance(err, McLlavaError) and isinstance(err, ValueError)


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda r: None, "no training images"),
        (lambda r: (r / "bo" / "train").rmdir(), "no training images"),
        (lambda r: (r / "bo" / "train" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "cannot read image"),
        (lambda r: (r / "bo" / "train" / "0.png").write_bytes(b""), "empty"),
        (lambda r: (r / "bo" / "train" / "0.heic").write_bytes(b"x"), "unsupported file type"),
    ],
)
def test_bad_training_files(tmp_path, setup, expected):
    make_concept(tmp_path, "ana")
    (tmp_path / "bo" / "train").mkdir(parents=True)
    setup(tmp_path)
    err = load_error(tmp_path)
    assert expected in str(err) and str(tmp_path / "bo") in str(err)


def test_truncated_image(tmp_path):
    path = img(tmp_path / "bo" / "train" / "0.png", size=(64, 64))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    err = load_error(tmp_path)
    assert str(path) in str(err) and "cannot read image" in str(err)


def test_no_concepts(tmp_path):
    assert "no concept folders" in str(load_error(tmp_path))
    assert "not found" in str(load_error(tmp_path / "missing"))


def test_image_limits(tmp_path):
    path = img(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(ConceptError, match="too many pixels"):
        load_image(path, ImageLimits(max_pixels=5000))
    with pytest.raises(ConceptError, match="too large"):
        load_image(path, ImageLimits(max_bytes=10))
    with pytest.raises(ConceptError, match="too small"):
        load_image(img(tmp_path / "tiny.png", size=(4, 40)))
    with pytest.raises(ConceptError, match="not found"):
        load_image(tmp_path / "nope.png")
    make_concept(tmp_path / "set", "bo")
    img(tmp_path / "set" / "bo" / "train" / "2.png", size=(100, 100))
    err = load_error(tmp_path / "set", limits=ImageLimits(max_pixels=5000))
    assert str(tmp_path / "set" / "bo" / "train" / "2.png") in str(err) and len(err.problems) == 1


def test_only_expected_formats_are_decoded(tmp_path):
    path = tmp_path / "disguised.png"
    Image.new("RGB", (16, 16)).save(path, format="TIFF")
    with pytest.raises(ConceptError, match="cannot read image"):
        load_image(path)
    jpeg_named_png = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (0, 200, 0)).save(jpeg_named_png, format="JPEG")
    assert load_image(jpeg_named_png).size == (16, 16)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = img(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard, below our limit
    with pytest.raises(ConceptError, match="too many pixels"):
        load_image(path)


def test_mask_problems(tmp_path):
    make_concept(tmp_path, "bo")
    mask(tmp_path / "bo" / "train" / "0_mask.png", size=(10, 10))
    mask(tmp_path / "bo" / "train" / "7_mask.png")
    err = str(load_error(tmp_path))
    assert "0_mask.png: mask is 10x10 but its image is 16x12" in err
    assert "7_mask.png: mask has no image" in err
    black = img(tmp_path / "black.png", color=0, mode="L")
    with pytest.raises(ConceptError, match="entirely black"):
        load_mask(black, (16, 12))


@pytest.mark.parametrize("cid", ["9lives", "_x", "bo bo", "bo.dog", "a" * 33, "<bo>", "é"])
def test_invalid_ids(tmp_path, cid):
    with pytest.raises(ConceptError, match="concept id"):
        validate_concept_id(cid)
    make_concept(tmp_path, "ana")
    if not cid.startswith("_"):  # underscore folders are ignored, not errors
        make_concept(tmp_path, cid)
        assert cid in str(load_error(tmp_path))


def test_valid_ids():
    for cid in ("bo", "Ana-Maria", "x_1", "a" * 32):
        validate_concept_id(cid)


def test_duplicate_ids_case_insensitive(tmp_path):
    make_concept(tmp_path, "Bo")
    make_concept(tmp_path, "bo")
    assert "same up to case" in str(load_error(tmp_path))


def test_id_clashing_with_soft_token(tmp_path):
    make_concept(tmp_path, "bo")
    make_concept(tmp_path, "bo_1")
    assert "soft token" in str(load_error(tmp_path))


@pytest.mark.parametrize("vocab", [["<bo>"], ["<bo_3>"], ["hello", "<bo_12>"]])
def test_id_collides_with_tokenizer(tmp_path, vocab):
    make_concept(tmp_path, "bo")
    err = load_error(tmp_path, tokenizer=FakeTokenizer(vocab))
    assert "collides with the existing tokenizer token" in str(err) and str(tmp_path / "bo") in str(err)
    ConceptSet.load(tmp_path, tokenizer=FakeTokenizer(["<bob>", "<bo_x>", "bo"]))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", "expected a mapping"),
        ("name: [unclosed\n", "invalid YAML"),
        ("nmae: Bo\n", "unknown key 'nmae'"),
        ("name: 12\n", "'name' must be text"),
        ("facts: {question: a, answer: b}\n", "'facts' must be a list"),
        ("facts:\n  - {question: a}\n", "facts[0]"),
        ("facts:\n  - {question: a, answer: 3}\n", "facts[0]"),
        ("facts:\n  - {question: a, answer: b, extra: c}\n", "facts[0]"),
        ("name: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
)
def test_bad_yaml(tmp_path, text, expected):
    make_concept(tmp_path, "bo", yaml_text=text)
    err = str(load_error(tmp_path))
    assert str(tmp_path / "bo" / "concept.yaml") in err and expected in err


@pytest.mark.parametrize(
    "folder, expected",
    [("bo+cy", "unknown concept id 'cy'"), ("bo", "two or more"), ("bo+bo", "two or more")],
)
def test_bad_multi_folder(tmp_path, folder, expected):
    make_concept(tmp_path, "bo")
    make_concept(tmp_path, "ana")
    img(tmp_path / "_multi" / folder / "0.png")
    err = str(load_error(tmp_path))
    assert str(tmp_path / "_multi" / folder) in err and expected in err


def test_check_images_off_skips_decoding(tmp_path):
    make_concept(tmp_path, "bo")
    (tmp_path / "bo" / "train" / "9.png").write_bytes(b"garbage")
    assert len(ConceptSet.load(tmp_path, check_images=False)["bo"].images) == 3
    assert "9.png" in str(load_error(tmp_path))


def test_odd_modes_load_as_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)
    i16 = tmp_path / "i16.png"
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(i16)
    pal = tmp_path / "pal.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).convert("P").save(pal)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(rgba)
    la = tmp_path / "la.png"
    Image.new("LA", (16, 16), (0, 255)).save(la)
    out = {p.stem: load_image(p) for p in (cmyk, i16, pal, rgba, la)}
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in out.values())
    assert out["cmyk"].getpixel((0, 0))[0] > 200 and out["cmyk"].getpixel((0, 0))[1] < 50  # red
    assert out["i16"].getpixel((0, 0)) == (255, 255, 255)
    assert out["pal"].getpixel((0, 0)) == (0, 0, 255)
    assert out["rgba"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert out["la"].getpixel((0, 0)) == (0, 0, 0)
    mid = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))
    mid.save(tmp_path / "mid.png")
    assert load_image(tmp_path / "mid.png").getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped


def _png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b, n: b[:n], st.just(_png_bytes()), st.integers(0, 120)),
        st.builds(
            lambda b, i, x: b[:i] + bytes([x]) + b[i + 1 :],
            st.just(_png_bytes()),
            st.integers(0, 120),
            st.integers(0, 255),
        ),
    ),
    suffix=st.sampled_from([".png", ".jpg", ".webp", ".bmp"]),
)
def test_fuzz_image_loader(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        im = load_image(path, ImageLimits(max_pixels=1_000_000))
    except ConceptError as exc:
        assert str(path) in str(exc)
    else:
        assert im.mode == "RGB"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                ["name:", "facts:", "- ", "question:", "answer:", " x", "\n", "  ", "{", "[", "&a", "*a", "!!int", "'"]
            ),
            max_size=30,
        ).map("".join),
    )
)
def test_fuzz_yaml(tmp_path, text):
    root = tmp_path / "fuzz"
    if not root.exists():
        make_concept(root, "bo", n=1)
    (root / "bo" / "concept.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cs = ConceptSet.load(root, check_images=False)
    except ConceptError as exc:
        assert "concept.yaml" in str(exc)
    else:
        bo = cs["bo"]
        assert isinstance(bo.name, str) and all(set(f) == {"question", "answer"} for f in bo.facts)
