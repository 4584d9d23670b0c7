"""decode_image: PIL's pixels for every kind of image (libjpeg-turbo for plain JPEGs, PIL for the rest), and
PIL's verdict on what is unreadable. The reference is PIL itself, the decoder of the file path before."""
import io
import logging

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from megaclass.data import ImageDataset
from megaclass.data.decode import decode_image


def _photo(h=72, w=90, seed=0):
    """A smooth colour field with noise: chroma subsampling and the IDCT both matter for it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 20
    smooth = np.stack([np.sin(yy + k) * np.cos(xx * (k + 1)) for k in range(3)], -1)
    return np.clip(128 + 90 * smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(array, mode=None, fmt="JPEG", **options):
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pil(data):
    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _extraneous_bytes():
    """A JPEG with junk before its scan: libjpeg-turbo warns ("Corrupt JPEG data"), both decoders go on."""
    data = _encode(_photo(), quality=90)
    scan = data.index(b"\xff\xda")
    return data[:scan] + b"\x00\x01\x02" + data[scan:]


def _sixteen_bit_png():
    buffer = io.BytesIO()
    Image.fromarray(_photo()[..., 0].astype(np.uint16) * 257).save(buffer, "PNG")  # mode I;16
    return buffer.getvalue()


# name -> (bytes, decoded by decode_jpeg?)
CASES = {
    "jpeg 4:2:0": (lambda: _encode(_photo(), quality=90), True),
    "jpeg 4:4:4": (lambda: _encode(_photo(), quality=95, subsampling=0), True),
    "jpeg progressive": (lambda: _encode(_photo(), quality=80, progressive=True), True),
    "jpeg odd size": (lambda: _encode(_photo(37, 53), quality=75), True),
    "jpeg greyscale": (lambda: _encode(_photo(), "L", quality=90), True),
    "jpeg extraneous bytes": (_extraneous_bytes, True),
    "jpeg cmyk": (lambda: _encode(_photo(), "CMYK", quality=90), False),
    "png rgba": (lambda: _encode(_photo(), "RGBA", "PNG"), False),
    "png palette": (lambda: _encode(_photo(), "P", "PNG"), False),
    "png 16-bit": (_sixteen_bit_png, False),
}


@pytest.mark.parametrize("name", CASES)
def test_decode_image_gives_pils_pixels(name, monkeypatch):
    make, by_libjpeg = CASES[name]
    data = make()
    calls = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = decode_image(data, name)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert torch.equal(image, _pil(data))
    assert bool(calls) == by_libjpeg


def _bomb_png():
    """A PNG whose header declares 30,000² pixels: over PIL's MAX_IMAGE_PIXELS × 2."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name, data, error", [
    ("truncated jpeg", _encode(_photo(), quality=90)[:900], "OSError"),
    ("empty", b"", "UnidentifiedImageError"),
    ("not an image", b"GIF? no, just text" * 10, "UnidentifiedImageError"),
    ("bomb", _bomb_png(), "DecompressionBombError"),
])
def test_unreadable_bytes_are_none_and_named_as_pil_names_them(name, data, error, caplog):
    with caplog.at_level(logging.WARNING):
        assert decode_image(data, f"shard-7.tar:{name}") is None
    assert f"unreadable image skipped: shard-7.tar:{name} ({error}" in caplog.text


def test_image_dataset_pixels_and_skips_are_the_pil_paths(tmp_path):
    """The file path before decode_jpeg, written out: PIL open, convert("RGB"), and below 64 px a bilinear
    resize. Large images keep their size; a truncated file and a missing one are unreadable, as before."""
    big, small_src = _photo(120, 150, seed=1), _photo(48, 40, seed=2)
    (tmp_path / "big.jpg").write_bytes(_encode(big, quality=90))
    (tmp_path / "small.jpg").write_bytes(_encode(small_src, quality=90))
    (tmp_path / "cut.jpg").write_bytes(_encode(big, quality=90)[:700])
    items = [("big.jpg", 0), ("small.jpg", 1), ("cut.jpg", 2), ("missing.jpg", 3)]
    for size in (32, 96):
        ds = ImageDataset(tmp_path, items, size, train=False)
        for i, name in enumerate(["big.jpg", "small.jpg"]):
            with Image.open(tmp_path / name) as img:
                img = img.convert("RGB")
                if size <= 64:
                    img = img.resize((size, size), Image.BILINEAR)
                expected = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            assert torch.equal(ds._decode(i), expected), (size, name)
        assert ds._decode(2) is None and ds._decode(3) is None
