"""Reading microscope images of any common format as 8-bit RGB, safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp"}
# Whole smear scans are large, but anything past this is far beyond a cell image and is treated as a
# decompression bomb rather than allocated.
MAX_PIXELS = 64_000_000


class UnreadableImage(Exception):
    """One image that cannot be decoded; callers skip and list it (or fail under --strict)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_rgb(path: Path) -> np.ndarray:
    """Return an ``(H, W, 3)`` uint8 array; greyscale, RGBA, palette and 16-bit are converted."""
    from PIL import Image, UnidentifiedImageError

    # Image.open reads only the header, so the size check below runs before any pixel is decoded.
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise UnreadableImage(f"{path}: {image.width}x{image.height} pixels exceeds the {MAX_PIXELS} limit")
            image.load()
            return _to_rgb8(image)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"{path}: refused as a decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImage(f"{path}: cannot decode ({reason})") from exc


def _to_rgb8(image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0.0
        scale = 255.0 / 65535.0 if high > 255 else 1.0
        grey = np.clip(array * scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in image.info):
        from PIL import Image

        rgba = image.convert("RGBA")
        # Transparent pixels become white, the colour of an empty slide background.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
