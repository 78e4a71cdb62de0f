"""Reading images for the vision tower: any PIL-readable file -> normalised float32 pixels.

Every mode PIL reads (grayscale, palette, RGBA, CMYK, 16-bit) is converted to RGB; transparent
pixels are composited over white. Like SigLIP's image processor, an image is resized to a square
`image_size` (bicubic, aspect ratio not kept) and normalised to `(x / 255 - 0.5) / 0.5`.
Problems a person can fix (not an image, truncated, smaller than one patch, a decompression
bomb) raise `UserError` naming the file and the fix.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jasper_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MEAN, STD = 0.5, 0.5  # SigLIP's processor: the same for every channel


def open_rgb(source: str | Path | bytes, name: str | None = None, min_side: int = 1) -> Image.Image:
    """Decoded RGB image from a path or encoded bytes.

    Args:
      source: a file path, or the encoded file contents.
      name: how to call the image in errors (defaults to the path).
      min_side: smallest width/height accepted (the patch size: a smaller image holds no patch).
    Raises:
      UserError: unreadable, not an image, truncated, too large for PIL's safety limit, or
        smaller than `min_side`.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
            with Image.open(stream) as image:
                image.load()
                rgb = _to_rgb(image)
    except FileNotFoundError as e:
        raise UserError(f"image {name} does not exist; fix: check the path") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(
            f"image {name} is too large to decode safely ({e}); fix: downscale it first"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(
            f"{name} is not a readable image ({type(e).__name__}: {e}); fix: remove it or "
            f"convert it to one of {', '.join(IMAGE_SUFFIXES)}"
        ) from e
    if min(rgb.size) < min_side:
        raise UserError(
            f"image {name} is {rgb.size[0]}x{rgb.size[1]} pixels, smaller than one "
            f"{min_side}x{min_side} patch; fix: use images at least {min_side} pixels on each side"
        )
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        top = max(values.max(), 1.0)
        image = Image.fromarray((values * (255.0 / top)).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """RGB image -> float32 [image_size, image_size, 3], normalised with mean/std 0.5."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return ((np.asarray(image, np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def load_pixels(
    source: str | Path | bytes, image_size: int, min_side: int = 1, name: str | None = None
) -> np.ndarray:
    """`open_rgb` then `to_pixels`: float32 [image_size, image_size, 3]."""
    return to_pixels(open_rgb(source, name, min_side), image_size)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file contents (lossless, what the caption dataset stores)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly (any extension), plus image files inside named folders (sorted).

    Raises UserError for a missing path or a folder without images.
    """
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            inside = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(
                    f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)}); fix: pass "
                    "the folder that holds them"
                )
            found.extend(inside)
        elif item.is_file():
            found.append(item)
        else:
            raise UserError(f"image path {item} does not exist; fix: check the path")
    return found
