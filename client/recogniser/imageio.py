"""Strict decoding of images from outside (files a site operator points the CLI at).

Every accepted image comes back as a ``(H, W, 3)`` uint8 RGB array; everything else raises a
:class:`~common.errors.DataError` with one line that names the file, the problem and the fix:

* not an image, or a format outside :data:`ALLOWED_FORMATS` -> refused;
* decompression bombs: the pixel count is read from the header and checked against ``max_pixels``
  *before* any pixel is decoded (and the file size against ``max_bytes`` before it is read);
* truncated or corrupt JPEG/PNG: the full decode must succeed (Pillow's default refuses truncated
  data and checks PNG CRCs);
* grayscale, palette, CMYK and 16-bit images are converted (16-bit keeps its high byte); transparent
  images are composited onto white; EXIF orientation is applied so faces are upright.

Pillow (a dependency of matplotlib) does the parsing; OpenCV's decoder silently returns half-grey
images for truncated JPEGs, which is why it is not used here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import DataError

ALLOWED_FORMATS = ("JPEG", "PNG", "PPM", "BMP")  # PPM covers PGM (ORL faces)
MAX_PIXELS = 40_000_000  # ~ a 7,700 x 5,200 photo
MAX_BYTES = 64 * 1024 * 1024


def read_image(
    path: str | Path, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> np.ndarray:
    """Read an image file into ``(H, W, 3)`` uint8 RGB, or raise a one-line :class:`DataError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read image {path} ({exc.strerror}); check the path") from exc
    if not path.is_file():
        raise DataError(f"image {path} is not a file; pass an image file")
    if size > max_bytes:
        raise DataError(
            f"image {path} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; "
            "downscale it first"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:  # e.g. PermissionError: stat works, reading does not
        raise DataError(
            f"cannot read image {path} ({exc.strerror}); check its permissions"
        ) from exc
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into ``(H, W, 3)`` uint8 RGB, or raise a one-line :class:`DataError`."""
    if not data:
        raise DataError(f"image {name} is empty; pass a JPEG or PNG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError as exc:
        raise DataError(
            f"{name} is not a supported image ({', '.join(ALLOWED_FORMATS)}); "
            "pass a JPEG or PNG photo"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"image {name} is too large to decode safely ({exc}); downscale it first"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {name} has a corrupt header ({exc}); re-export the file") from exc
    width, height = img.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise DataError(
            f"image {name} declares {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
            "(a decompression bomb or a huge photo); downscale it first"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return _to_rgb8(upright, name)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"image {name} is truncated or corrupt ({exc}); re-copy or re-export the file"
        ) from exc


def _to_rgb8(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 0xFFFF:
            raise DataError(
                f"image {name} has 32-bit pixels outside 0..65535; save it as 8 or 16 bit"
            )
        gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"image {name} has floating-point pixels; save it as an 8-bit JPEG or PNG")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)
