"""Media files: where a record may point (``MediaPaths``), and one place that decodes an image.

Every failure (missing, unreadable, corrupt, truncated, empty, zero-size, too large, animated, outside the
allowed folders) becomes a ``MediaError`` naming the file, so a bad record in a million-image dataset is found
by name instead of by a stack trace.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class MediaError(ValueError):
    """A media file could not be decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


REFUSED = "refused: outside the dataset folder and the media roots"


class MediaPaths:
    """Where the media paths of records start and which folders they may point into.

    A relative path starts at ``base_dir`` (the JSON file's folder, or ``data.image_folder``). A path that
    leaves ``base_dir`` and every one of ``roots`` (``data.media_roots``, ``--media-root``), by ``..`` or by
    being absolute, is refused before the file system is touched, with one message whether or not it exists:
    a record can neither read nor probe files elsewhere on the machine. Paths are compared as written
    (normalised, not resolved), so a symlink the user placed inside the data folder is followed.
    """

    def __init__(self, base_dir: str | os.PathLike, roots: Iterable[str | os.PathLike] = ()):
        self.base = Path(os.path.abspath(base_dir))
        self.roots = [self.base, *(Path(os.path.abspath(r)) for r in roots)]

    def resolve(self, entry: str | os.PathLike) -> Path:
        """The absolute path of one media entry of a record, or ``MediaError`` if it is refused."""
        path = Path(os.path.normpath(self.base / entry))
        if not any(path == root or root in path.parents for root in self.roots):
            raise MediaError(entry, REFUSED)
        return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError(path, "file not found")
    if path.is_dir():
        raise MediaError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale -> 8-bit, scaling instead of clipping at 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float images in 0..1
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over white (how viewers show it)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_l(image)
    return image.convert("RGB")


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the pixels as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError):
        return image.copy()


def load_image(path: str | os.PathLike, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode an image file fully into an RGB ``PIL.Image``, EXIF orientation applied.

    The header is read first and width*height checked against ``max_pixels`` before any pixel is
    decoded (decompression-bomb guard); the file is then decoded completely so truncation fails here,
    not later inside a data loader worker.
    """
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height == 0:
                    raise MediaError(path, f"zero-size image ({width}x{height})")
                if width * height > max_pixels:
                    size = f"{width}x{height} = {width * height} pixels"
                    raise MediaError(path, f"image too large: {size} > max_pixels={max_pixels}")
                frames = getattr(image, "n_frames", 1)
                if frames > 1:  # decoding would silently keep the first frame only
                    raise MediaError(
                        path,
                        f"animated or multi-frame image ({frames} frames); an image input takes one frame",
                    )
                image.load()
                upright = _exif_upright(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(path, f"image too large (decompression bomb guard): {err}") from err
    except UnidentifiedImageError as err:
        raise MediaError(path, "not a recognised image format (corrupt or not an image)") from err
    except PermissionError as err:
        raise MediaError(path, f"cannot read file: {err.strerror or err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports truncated or corrupt pixel data as OSError, some plugins as SyntaxError/ValueError.
        raise MediaError(path, f"corrupt or truncated image data: {err}") from err
    try:
        return to_rgb(upright)
    except ValueError as err:  # e.g. a colour mode PIL cannot convert (LAB)
        raise MediaError(path, f"unsupported image mode {upright.mode!r}: {err}") from err


def load_images(paths: Iterable[str | os.PathLike], **kwargs) -> list[Image.Image]:
    """``load_image`` for each path, in order; the first bad file raises its ``MediaError``."""
    return [load_image(path, **kwargs) for path in paths]
