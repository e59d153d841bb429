"""Load and validate a user's concept folder.

A concept folder is what a user prepares (see DESIGN.md)::

    ROOT/<id>/concept.yaml              optional: name, category, description, facts: [{question, answer}]
    ROOT/<id>/train/0.jpg  0_mask.png   training images; masks optional (white = concept)
    ROOT/_multi/<id1>+<id2>/*.png       training images that show several concepts at once

Everything is checked up front, before any training starts, and every problem is reported together in one
:class:`~mcllava.errors.ConceptError` that names each offending file, so a user fixes the folder in one go.
Images are untrusted input: sizes are checked before decoding, and decoding failures of any kind become
``ConceptError``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps

from .errors import ConceptError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Decoders Pillow may use, whatever the file name says: never EPS (Ghostscript), PSD, TIFF and other exotica.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # JPEG also covers MPO (phone photos)
MASK_SUFFIX = "_mask.png"
MULTI_DIR = "_multi"
YAML_NAME = "concept.yaml"
YAML_KEYS = ("name", "category", "description", "facts")
MAX_YAML_BYTES = 1 << 20
MAX_ID_LENGTH = 32
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class ImageLimits:
    """Limits an image must respect before it is decoded (guards against decompression bombs)."""

    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 2**20
    min_side: int = 8


# --------------------------------------------------------------------------------------------- images


def _open_decoded(path: Path, limits: ImageLimits) -> Image.Image:
    """Open ``path``, check its byte and pixel counts before decoding, then decode it fully (EXIF-upright)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ConceptError(f"{path}: image file not found") from None
    if not path.is_file():
        raise ConceptError(f"{path}: expected an image file, found a folder or special file")
    if st.st_size == 0:
        raise ConceptError(f"{path}: image file is empty (0 bytes)")
    if st.st_size > limits.max_bytes:
        raise ConceptError(f"{path}: image file is too large ({st.st_size:,} bytes; the limit is {limits.max_bytes:,})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > limits.max_pixels:
                    raise ConceptError(
                        f"{path}: image has too many pixels ({w}x{h} = {w * h:,}; the limit is {limits.max_pixels:,})"
                    )
                if min(w, h) < limits.min_side:
                    raise ConceptError(
                        f"{path}: image is too small ({w}x{h}; each side needs at least {limits.min_side} pixels)"
                    )
                im.load()
                return ImageOps.exif_transpose(im)
    except ConceptError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ConceptError(f"{path}: image has too many pixels (possible decompression bomb)") from None
    except Exception as exc:  # Pillow raises many exception types on hostile files; all mean "cannot decode"
        raise ConceptError(f"{path}: cannot read image (corrupt, truncated or not an image): {exc}") from None


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on ``background``."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # High-bit-depth grey: Pillow's own conversion clips at 255, so scale to the 8-bit range instead.
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = a.max(initial=0.0)
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            a = a / 257.0
        elif im.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 65535:
            a = a * (255.0 / top)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Load an untrusted image as fully decoded 8-bit RGB, or raise :class:`ConceptError` naming the file.

    Byte size and pixel count are checked before decoding. Palette, alpha (composited on white), CMYK and
    16-bit images are converted sensibly; EXIF orientation is applied.
    """
    im = _open_decoded(Path(path), limits)
    try:
        return _to_rgb(im, background=(255, 255, 255))
    except Exception as exc:
        raise ConceptError(f"{path}: unsupported image colour mode {im.mode!r}: {exc}") from None


def load_mask(path: Path, size: tuple[int, int], limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Load a concept mask as a bool array ``[H, W]`` (white, >127 in grey = concept).

    ``size`` is the ``(width, height)`` of the mask's image; a mask of another size, an unreadable mask and a
    mask with no concept pixel at all are :class:`ConceptError`. Transparent pixels count as background.
    """
    im = _open_decoded(Path(path), limits)
    if tuple(im.size) != tuple(size):
        raise ConceptError(
            f"{path}: mask is {im.size[0]}x{im.size[1]} but its image is {size[0]}x{size[1]}; they must be the same size"
        )
    try:
        grey = np.asarray(_to_rgb(im, background=(0, 0, 0)).convert("L"))
    except Exception as exc:
        raise ConceptError(f"{path}: unsupported mask colour mode {im.mode!r}: {exc}") from None
    mask = grey > 127
    if not mask.any():
        raise ConceptError(f"{path}: mask is entirely black; white pixels must mark where the concept is")
    return mask


# ------------------------------------------------------------------------------------------------ ids


def validate_concept_id(cid: str, tokenizer: Any = None, path: Path | None = None) -> None:
    """Check a concept id: 1..32 letters, digits, ``_`` or ``-``, starting with a letter.

    With a tokenizer, ``<cid>`` must not already be one of its tokens (vocabulary, added or special tokens),
    and no ``<cid_N>`` may exist either, since those strings become the concept's own tokens.
    """
    where = f"{path}: " if path is not None else ""
    if not isinstance(cid, str) or not cid:
        raise ConceptError(f"{where}concept id must be a non-empty string, got {cid!r}")
    if len(cid) > MAX_ID_LENGTH:
        raise ConceptError(f"{where}concept id {cid!r} is too long ({len(cid)} characters; at most {MAX_ID_LENGTH})")
    if not _ID_RE.fullmatch(cid):
        raise ConceptError(
            f"{where}concept id {cid!r} is invalid: use letters, digits, '_' and '-', starting with a letter"
        )
    if tokenizer is None:
        return
    known = set(tokenizer.get_vocab())
    if hasattr(tokenizer, "get_added_vocab"):
        known |= set(tokenizer.get_added_vocab())
    known |= set(getattr(tokenizer, "all_special_tokens", None) or ())
    token = f"<{cid}>"
    if token in known:
        raise ConceptError(
            f"{where}concept id {cid!r} collides with the existing tokenizer token {token!r}; rename the folder"
        )
    soft = re.compile(re.escape(f"<{cid}_") + r"\d+>")
    clash = sorted(t for t in known if isinstance(t, str) and soft.fullmatch(t))
    if clash:
        raise ConceptError(
            f"{where}concept id {cid!r} collides with the existing tokenizer token {clash[0]!r}; rename the folder"
        )


def id_clashes(ids: Iterable[str]) -> list[str]:
    """Describe clashes within a set of ids: duplicates up to case, and an id equal to another's ``<id_N>`` token."""
    ids = list(ids)
    problems = []
    seen: dict[str, str] = {}
    for cid in ids:
        if cid.lower() in seen:
            problems.append(f"concept ids {seen[cid.lower()]!r} and {cid!r} are the same up to case")
        else:
            seen[cid.lower()] = cid
    for cid in ids:
        for other in ids:
            if re.fullmatch(re.escape(other.lower()) + r"_\d+", cid.lower()):
                problems.append(f"concept id {cid!r} clashes with the soft token <{cid}> of concept {other!r}")
    return problems


# -------------------------------------------------------------------------------------------- concepts


@dataclass
class ConceptImage:
    """One training image of a concept, with its optional mask."""

    path: Path
    mask_path: Path | None = None

    def load(self, limits: ImageLimits = ImageLimits()) -> tuple[Image.Image, np.ndarray | None]:
        """Return the RGB image and its bool mask ``[H, W]`` (``None`` without a mask file)."""
        image = load_image(self.path, limits)
        mask = load_mask(self.mask_path, image.size, limits) if self.mask_path is not None else None
        return image, mask


@dataclass
class Concept:
    """A user concept: its id (the folder name), training images and display information."""

    id: str
    root: Path
    images: list[ConceptImage]
    name: str
    category: str | None = None
    description: str | None = None
    facts: list[dict[str, str]] = field(default_factory=list)

    @property
    def token(self) -> str:
        """The identifier token, ``<id>``."""
        return f"<{self.id}>"


@dataclass
class MultiImage:
    """A training image that shows several concepts at once (from ``_multi/<id1>+<id2>/``)."""

    path: Path
    present: list[str]


def _natural_key(name: str) -> tuple:
    """Sort key that orders ``2.png`` before ``10.png``."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read and check ``concept.yaml``; return its mapping (empty for an empty file)."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConceptError(f"{path}: file is too large (over {MAX_YAML_BYTES:,} bytes)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConceptError(f"{path}: file is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except Exception as exc:  # PyYAML can raise more than YAMLError on hostile text (e.g. IndexError)
        raise ConceptError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConceptError(f"{path}: expected a mapping of {', '.join(YAML_KEYS)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in YAML_KEYS]
    if unknown:
        raise ConceptError(f"{path}: unknown key {unknown[0]!r} (allowed keys: {', '.join(YAML_KEYS)})")
    for key in ("name", "category", "description"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConceptError(f"{path}: {key!r} must be text, got {type(value).__name__} (quote it)")
    if data.get("name") is not None and not data["name"].strip():
        raise ConceptError(f"{path}: 'name' is empty")
    facts = data.get("facts")
    if facts is None:
        data["facts"] = []
    elif not isinstance(facts, list):
        raise ConceptError(f"{path}: 'facts' must be a list of {{question, answer}} entries")
    else:
        for i, fact in enumerate(facts):
            ok = (
                isinstance(fact, dict)
                and set(fact) == {"question", "answer"}
                and all(isinstance(v, str) and v.strip() for v in fact.values())
            )
            if not ok:
                raise ConceptError(
                    f"{path}: facts[{i}] must have exactly a 'question' and an 'answer', both non-empty text"
                )
        data["facts"] = [{"question": f["question"], "answer": f["answer"]} for f in facts]
    return data


def _scan_images(folder: Path, allow_masks: bool, problems: list[str]) -> list[ConceptImage]:
    """List a folder's images (natural order) and pair each with its ``<stem>_mask.png``."""
    files = sorted((p for p in folder.iterdir() if _visible(p) and p.is_file()), key=lambda p: _natural_key(p.name))
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for p in files:
        stem, suffix = p.stem, p.suffix.lower()
        if stem.endswith("_mask") and suffix in IMAGE_SUFFIXES:
            if not allow_masks:
                problems.append(f"{p}: masks are not used in {MULTI_DIR} folders; remove it")
            elif suffix != ".png":
                problems.append(f"{p}: masks must be PNG files (<image name>{MASK_SUFFIX})")
            else:
                masks[stem[: -len("_mask")]] = p
        elif suffix in IMAGE_SUFFIXES:
            if stem in images:
                problems.append(f"{p}: two images share the name {stem!r} ({images[stem].name}); rename one")
            else:
                images[stem] = p
        else:
            problems.append(f"{p}: unsupported file type; training images must be {', '.join(IMAGE_SUFFIXES)}")
    for stem, m in masks.items():
        if stem not in images:
            problems.append(f"{m}: mask has no image named {stem!r} beside it")
    return [ConceptImage(p, masks.get(stem)) for stem, p in images.items()]


def _check_files(images: Iterable[ConceptImage], limits: ImageLimits, problems: list[str]) -> None:
    """Decode every image and mask once, collecting problems (the pixels are not kept)."""
    for item in images:
        try:
            item.load(limits)
        except ConceptError as exc:
            problems.append(str(exc))


@dataclass
class ConceptSet:
    """All concepts of a concept folder, plus its multi-concept training images; ordered by id."""

    root: Path
    concepts: list[Concept]
    multi: list[MultiImage] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        root: str | Path,
        tokenizer: Any = None,
        limits: ImageLimits = ImageLimits(),
        check_images: bool = True,
    ) -> ConceptSet:
        """Load and validate a concept folder; raise one :class:`ConceptError` that lists every problem.

        With ``check_images`` (the default) every image and mask is decoded once here, so that training
        never fails half-way on a bad file; without it only names and ``concept.yaml`` are checked.
        With a ``tokenizer``, ids that would collide with its existing tokens are refused.
        """
        root = Path(root)
        if not root.is_dir():
            raise ConceptError(f"{root}: concept folder not found (or not a folder)")
        problems: list[str] = []
        folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
        concepts: list[Concept] = []
        for folder in sorted(folders, key=lambda p: _natural_key(p.name)):
            concept = cls._load_concept(folder, tokenizer, limits, check_images, problems)
            if concept is not None:
                concepts.append(concept)
        ids = [p.name for p in folders]
        problems += [f"{root}: {p}" for p in id_clashes(ids)]
        if not folders:
            problems.append(f"{root}: no concept folders found (expected {root}/<id>/train/<images>)")
        multi = cls._load_multi(root, set(ids), limits, check_images, problems)
        if problems:
            head = f"concept folder {root} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:"
            raise ConceptError("\n  - ".join([head, *problems]), problems)
        concepts.sort(key=lambda c: c.id)
        return cls(root=root, concepts=concepts, multi=multi)

    @staticmethod
    def _load_concept(
        folder: Path, tokenizer: Any, limits: ImageLimits, check_images: bool, problems: list[str]
    ) -> Concept | None:
        """Load one concept folder, appending its problems; ``None`` if it is unusable."""
        before = len(problems)
        try:
            validate_concept_id(folder.name, tokenizer, folder)
        except ConceptError as exc:
            problems.append(str(exc))
        meta: dict[str, Any] = {}
        yaml_path = folder / YAML_NAME
        if yaml_path.is_file():
            try:
                meta = _read_yaml(yaml_path)
            except ConceptError as exc:
                problems.append(str(exc))
        train = folder / "train"
        images = _scan_images(train, True, problems) if train.is_dir() else []
        if not images:
            problems.append(f"{train}: no training images (expected {', '.join(IMAGE_SUFFIXES)} files here)")
        elif check_images:
            _check_files(images, limits, problems)
        if len(problems) > before:
            return None
        return Concept(
            id=folder.name,
            root=folder,
            images=images,
            name=meta.get("name") or folder.name,
            category=meta.get("category"),
            description=meta.get("description"),
            facts=meta.get("facts", []),
        )

    @staticmethod
    def _load_multi(
        root: Path, known: set[str], limits: ImageLimits, check_images: bool, problems: list[str]
    ) -> list[MultiImage]:
        """Load ``_multi/<id1>+<id2>[+...]/`` folders of images that show several concepts."""
        multi_root = root / MULTI_DIR
        if not multi_root.is_dir():
            return []
        multi: list[MultiImage] = []
        for folder in sorted(filter(_visible, multi_root.iterdir()), key=lambda p: _natural_key(p.name)):
            if not folder.is_dir():
                problems.append(f"{folder}: expected only folders named <id1>+<id2> in {multi_root}")
                continue
            ids = folder.name.split("+")
            bad = [i for i in ids if i not in known]
            if len(ids) < 2 or len(set(ids)) != len(ids):
                problems.append(f"{folder}: folder name must list two or more different concept ids joined by '+'")
                continue
            if bad:
                problems.append(
                    f"{folder}: unknown concept id{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
                )
                continue
            images = _scan_images(folder, False, problems)
            if not images:
                problems.append(f"{folder}: no images")
            elif check_images:
                _check_files(images, limits, problems)
            multi += [MultiImage(path=img.path, present=sorted(ids)) for img in images]
        return multi

    @property
    def ids(self) -> list[str]:
        """Concept ids, sorted."""
        return [c.id for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts)

    def __contains__(self, cid: object) -> bool:
        return any(c.id == cid for c in self.concepts)

    def __getitem__(self, cid: str) -> Concept:
        for c in self.concepts:
            if c.id == cid:
                return c
        raise KeyError(f"no concept {cid!r} in {self.root} (concepts: {', '.join(self.ids)})")
