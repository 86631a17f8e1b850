"""Image loading/preprocessing: golden equality with the original processor, mode handling, strict errors."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file

from visualglm.image import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageNotFoundError,
    decode_image_bytes,
    image_hash,
    image_to_tensor,
    load_image,
    preprocess,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
WHITE = ((1 - MEAN) / STD).view(3)
BLACK = ((0 - MEAN) / STD).view(3)


@pytest.fixture(scope="module")
def chelsea_path(reference_dir: Path) -> Path:
    return reference_dir / "chelsea.png"


@pytest.fixture(scope="module")
def chelsea_bytes(chelsea_path: Path) -> bytes:
    return chelsea_path.read_bytes()


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> torch.Tensor:
    return load_file(str(reference_dir / "cases.safetensors"))["a_image_zh_turn1.image"]


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but whose pixel data is garbage: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def test_golden_all_input_forms(chelsea_path, chelsea_bytes, golden):
    b64 = base64.encodebytes(chelsea_bytes).decode()  # with newlines every 76 characters
    sources = [
        str(chelsea_path), chelsea_path, chelsea_bytes, bytearray(chelsea_bytes), b64,
        base64.b64encode(chelsea_bytes).decode(), "data:image/png;base64," + b64.replace("\n", ""),
        Image.open(chelsea_path),
    ]
    assert golden.shape == (1, 3, 224, 224) and golden.dtype == torch.float32
    for src in sources:
        t = image_to_tensor(src)
        assert t.shape == (1, 3, 224, 224) and t.dtype == torch.float32
        assert (t - golden).abs().max().item() <= 1e-6, type(src)
    assert preprocess(load_image(chelsea_path)).shape == (3, 224, 224)


def test_golden_hash_and_passthrough(golden):
    assert image_to_tensor(golden) is golden
    assert torch.equal(image_to_tensor(golden[0]), golden)
    assert image_hash(golden) == image_hash(golden.clone()) and len(image_hash(golden)) == 64
    assert image_hash(golden) != image_hash(golden.reshape(1, 3, 112, 448))
    for bad in (torch.zeros(3, 100, 100), torch.zeros(2, 3, 224, 224), torch.zeros(224, 224),
                torch.zeros(1, 3, 224, 224, dtype=torch.uint8)):
        with pytest.raises(ImageError, match="image tensor"):
            image_to_tensor(bad)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "YCbCr", "I", "F"])
def test_modes_white_and_black(mode):
    white = Image.new("RGB", (8, 6), (255, 255, 255)).convert(mode)
    black = Image.new("RGB", (8, 6), (0, 0, 0)).convert(mode)
    for img, expect in ((white, WHITE), (black, BLACK)):
        t = image_to_tensor(img, size=32)
        assert t.shape == (1, 3, 32, 32)
        assert torch.allclose(t[0, :, 5, 5], expect, atol=1e-5), mode


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    rgb = load_image(img)
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (0,) * 3, (1,) * 3]
    assert load_image(Image.fromarray(arr.astype(np.int32))).getpixel((1, 0)) == (128,) * 3  # mode "I"
    full = image_to_tensor(Image.fromarray(np.full((4, 4), 65535, np.uint16)), size=8)
    assert torch.allclose(full[0, :, 0, 0], WHITE, atol=1e-6)
    # round trip through a real 16-bit PNG file
    assert load_image(_png(Image.fromarray(arr))).getpixel((1, 0)) == (128,) * 3


def test_transparency_becomes_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    out = load_image(_png(rgba))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    half = load_image(Image.new("LA", (2, 2), (0, 128)))
    assert half.getpixel((0, 0)) == (127, 127, 127)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.putpixel((1, 0), 1)
    out = load_image(_png(pal, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _png(img, exif=exif.tobytes())
    assert load_image(data).size == (20, 40)
    assert load_image(data, exif_transpose=False).size == (40, 20)


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty"),
    (b"hello, this is plain text\n", "not a recognised image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
])
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_truncated_png(chelsea_bytes, tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    half = chelsea_bytes[: len(chelsea_bytes) // 2]
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image_bytes(half)
    (tmp_path / "half.png").write_bytes(half)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "half.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(str(tmp_path / "notes.txt"))


def test_decompression_bombs(chelsea_bytes):
    # Rejected from the header alone: decoding the garbage IDAT would give a "corrupt" error instead.
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(_png_header_only(9000, 9000))  # 81 Mpx > 64 Mpx default, below PIL's own limit
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header_only(20000, 20000))  # PIL's own DecompressionBombError, converted
    assert DEFAULT_MAX_PIXELS < 9000 * 9000
    with pytest.raises(ImageError, match="max_pixels=1000"):
        load_image(chelsea_bytes, max_pixels=1000)
    with pytest.raises(ImageError, match="max_bytes"):
        load_image(chelsea_bytes, max_bytes=1000)
    with pytest.raises(ImageError, match="max_bytes"):
        load_image(base64.b64encode(chelsea_bytes).decode(), max_bytes=1000)


def test_string_resolution_errors(chelsea_path, chelsea_bytes):
    with pytest.raises(ImageError, match="allow_remote=True"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageNotFoundError, match="image file not found: no/such/cat.png"):
        load_image("no/such/cat.png")
    with pytest.raises(FileNotFoundError):
        load_image("abcd/efgh")  # valid base64 alphabet, but decodes to no image: treated as a path
    with pytest.raises(ImageError, match="expected a PIL image"):
        load_image("??? not an image ???")
    with pytest.raises(ImageError, match="unsupported image input type"):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="media type"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="empty"):
        load_image("   ")


def test_local_files_refused_when_disabled(chelsea_path, chelsea_bytes):
    for src in (str(chelsea_path), chelsea_path):
        with pytest.raises(ImageError, match="local file paths are not accepted"):
            load_image(src, allow_local_files=False)
    b64 = base64.b64encode(chelsea_bytes).decode()
    assert load_image(b64, allow_local_files=False).size == (451, 300)
    assert load_image("data:image/png;base64," + b64, allow_local_files=False).size == (451, 300)


def test_remote_download_from_local_server(chelsea_bytes, golden, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(chelsea_bytes)))
            self.end_headers()
            self.wfile.write(chelsea_bytes)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/chelsea.png"
        t = image_to_tensor(url, allow_remote=True, timeout=5)
        assert (t - golden).abs().max().item() <= 1e-6
        with pytest.raises(ImageError, match="max_bytes"):
            load_image(url, allow_remote=True, max_bytes=1000, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
