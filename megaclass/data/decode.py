"""Image bytes -> uint8 [3, H, W]: one decoder for every input path (image files, tar shards, the benchmark).

JPEGs whose header PIL reads as RGB or greyscale are decoded by libjpeg-turbo through
`torchvision.io.decode_jpeg` (1.2-1.3x PIL's decode rate, 1.1-1.3x with the training transform:
docs/scale.md); its pixels equal PIL's (both run libjpeg-turbo's default IDCT and chroma upsampling, without PIL's draft mode), which
tests/test_data_decode.py checks. Everything else (PNG, CMYK or YCCK JPEGs, MPO, 16-bit, ...), and a JPEG
that libjpeg-turbo refuses, goes to PIL exactly as before. So what counts as unreadable is what PIL
refuses: the header is read by PIL first (`Image.open` reads only the header; it also raises the
decompression-bomb error, above `MAX_IMAGE_PIXELS` × 2), and PIL decides whenever decode_jpeg fails.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# PIL modes whose JPEGs decode_jpeg(mode=RGB) turns into exactly PIL's `convert("RGB")`
_LIBJPEG_MODES = ("RGB", "L")


def decode_image(data: bytes | bytearray | memoryview, where: str) -> torch.Tensor | None:
    """The image in `data` as uint8 [3, H, W] (RGB), or None (logged once, naming `where`, the file or
    shard member it came from) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in _LIBJPEG_MODES:
                image = _libjpeg(data)
                if image is not None:
                    return image
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        return _skipped(where, exc)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _libjpeg(data) -> torch.Tensor | None:
    """decode_jpeg's RGB image, or None where libjpeg-turbo refuses the data (PIL then decides)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        # decode_jpeg wants a writable buffer; the copy costs ~1 % of the decode
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None


def _skipped(where: str, exc: BaseException) -> None:
    log.warning("unreadable image skipped: %s (%s: %s)", where, type(exc).__name__, exc)
    return None
