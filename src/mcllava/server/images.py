"""Untrusted images in, marked images out: decoding with `ServerLimits` and `load_image`'s checks."""

from __future__ import annotations

import base64
import binascii
import io
import os
import uuid
import warnings
from pathlib import Path

from PIL import Image

from ..concepts import IMAGE_FORMATS, ImageLimits, load_image
from ..errors import ConceptError
from .limits import ApiError, ServerLimits

RETURNED_IMAGE_SIDE = 1024  # marked images come back at most this large (JPEG)


def image_data_url(image: Image.Image, side: int = RETURNED_IMAGE_SIDE, fmt: str = "JPEG") -> str:
    """A (downscaled) copy of `image` as a data URL."""
    image = image.convert("RGB")
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=88)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ImageDecoder:
    """Untrusted image bytes or data URLs -> RGB images, with `ServerLimits` and `load_image`'s validation.

    Bytes are checked for size and header pixel count in memory, then written under a private temporary
    folder with a random name (never the client's file name) for `load_image`, and deleted at once.
    """

    def __init__(self, limits: ServerLimits, folder: Path):
        self.limits, self.folder = limits, folder

    def from_data_url(self, url: str) -> Image.Image:
        if not url.startswith("data:"):
            raise ApiError(
                400,
                "images must be sent as data URLs (data:image/png;base64,...); remote image URLs are not fetched",
                "invalid_image",
            )
        head, comma, payload = url.partition(",")
        if not comma or not head.lower().endswith(";base64") or not head.lower().startswith("data:image/"):
            raise ApiError(
                400, "the image data URL must be of the form data:image/<type>;base64,<data>", "invalid_image"
            )
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > self.limits.max_image_bytes + 2:
            raise self._too_many_bytes()
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL is not valid base64", "invalid_image") from None
        return self.from_bytes(data)

    def _too_many_bytes(self) -> ApiError:
        return ApiError(
            413, f"the image is larger than the limit of {self.limits.max_image_bytes:,} bytes", "limit_exceeded"
        )

    def from_bytes(self, data: bytes) -> Image.Image:
        if not data:
            raise ApiError(400, "the image is empty (0 bytes)", "invalid_image")
        if len(data) > self.limits.max_image_bytes:
            raise self._too_many_bytes()
        too_many = ApiError(
            413, f"the image has more pixels than the limit of {self.limits.max_pixels:,}", "limit_exceeded"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    width, height = im.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except Exception:
            raise ApiError(
                400, "cannot read the image: corrupt, truncated, or not JPEG, PNG, WebP or BMP", "invalid_image"
            ) from None
        if width * height > self.limits.max_pixels:
            raise too_many
        if max(width, height) > self.limits.max_aspect_ratio * max(1, min(width, height)):
            raise ApiError(
                413,
                f"the image is {width:,}x{height:,} pixels, {max(width, height) / max(1, min(width, height)):,.0f} times "
                f"longer than wide; the limit is {self.limits.max_aspect_ratio:g} times",
                "limit_exceeded",
            )
        path = self.folder / f"{uuid.uuid4().hex}.img"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return load_image(
                path, ImageLimits(max_pixels=self.limits.max_pixels, max_bytes=self.limits.max_image_bytes)
            )
        except ConceptError as exc:
            raise ApiError(400, str(exc).replace(str(path), "image"), "invalid_image") from None
        finally:
            path.unlink(missing_ok=True)
