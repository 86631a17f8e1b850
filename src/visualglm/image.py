"""Image input handling: anything a user may hand us -> the tensor VisualGLM's vision encoder expects.

Preprocessing is faithful to the original ``BlipImageEvalProcessor(224)``: RGB, a straight bicubic resize to
224x224 (no crop, aspect ratio not kept), ``/255`` in float32, CLIP mean/std normalisation, CHW.

Loading is deliberately strict, because images may come from untrusted HTTP clients: sizes are checked
before pixel data is decoded (decompression bombs), every image is fully decoded once so truncated files fail
here and not deep inside the model, and this module never enables ``ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image
TensorOrImage = ImageInput | torch.Tensor

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 64 megapixels (an 8000x8000 photo) is far beyond any camera image worth resizing to 224x224, yet its RGB
# decode (~190 MiB) is still affordable; it also stays below PIL's own bomb limit (~89 Mpx warning).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # encoded file size; bounds memory/bandwidth before any decoding

_ACCEPTED = ("a PIL image, raw image bytes, a file path, a base64 string, a data:image/...;base64 URL, "
             "or an http(s) URL (with allow_remote=True)")
_EXIF_ORIENTATION = 0x0112
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP"}


class ImageError(ValueError):
    """Any problem with an image input; a ValueError so callers (e.g. the server) can map it to HTTP 400."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """A string that looks like a path names no file; also a FileNotFoundError for natural ``except``s."""


def decode_image_bytes(data: bytes | bytearray | memoryview, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_bytes: int = DEFAULT_MAX_BYTES, exif_transpose: bool = True) -> Image.Image:
    """Decode image file contents to RGB. Touches no filesystem or network, so it is safe for server input."""
    data = bytes(data)
    if not data:
        raise ImageError("empty image data")
    if len(data) > max_bytes:
        raise ImageError(f"image data is {len(data)} bytes, more than max_bytes={max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between ~89 and ~179 Mpx; make that a hard failure as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        fmt = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
        if fmt:
            raise ImageError(f"corrupt {fmt} image: its header could not be parsed") from e
        raise ImageError(f"data is not a recognised image format ({len(data)} bytes, starts with "
                         f"{data[:16]!r})") from e
    except Exception as e:  # PIL's parsers raise many exception types on malformed headers
        raise ImageError(f"corrupt image header: {type(e).__name__}: {e}") from e
    return _finish(img, max_pixels, exif_transpose)


def load_image(source: ImageInput, *, allow_remote: bool = False, allow_local_files: bool = True,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
               timeout: float = 10.0, exif_transpose: bool = True) -> Image.Image:
    """Turn any accepted image input into a fully decoded RGB PIL image.

    String resolution order: existing file -> ``data:`` URL -> ``http(s)://`` URL -> strict base64. With
    ``allow_local_files=False`` the filesystem is never consulted (not even to test existence), so untrusted
    strings cannot read or probe server files. ``exif_transpose`` rotates camera photos upright; the original
    VisualGLM did not, but the golden fixture carries no EXIF, so the default stays faithful there and pass
    ``exif_transpose=False`` for bit-exact original behaviour on EXIF-rotated photos.
    """
    kw = {"max_pixels": max_pixels, "max_bytes": max_bytes, "exif_transpose": exif_transpose}
    if isinstance(source, Image.Image):
        return _finish(source, max_pixels, exif_transpose)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(source, **kw)
    if isinstance(source, os.PathLike):
        if not allow_local_files:
            raise ImageError("local file paths are not accepted here; send the image as base64 or a data URL")
        return decode_image_bytes(_read_file(os.fspath(source), max_bytes), **kw)
    if not isinstance(source, str):
        raise ImageError(f"unsupported image input type {type(source).__name__}; expected {_ACCEPTED}")
    text = source.strip()
    if not text:
        raise ImageError("empty image string")
    if allow_local_files and len(text) < 4096 and os.path.isfile(os.path.expanduser(text)):
        return decode_image_bytes(_read_file(os.path.expanduser(text), max_bytes), **kw)
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        return decode_image_bytes(_parse_data_url(text, max_bytes), **kw)
    if lowered.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(f"remote image URLs are disabled ({text[:80]}); pass allow_remote=True "
                             "to download them, or download the image yourself")
        return decode_image_bytes(_download(text, max_bytes, timeout), **kw)
    data = _b64decode(text, max_bytes)
    path_like = _looks_like_path(text)
    if data is None or (path_like and not _has_image_magic(data)):
        if path_like and allow_local_files:
            raise ImageNotFoundError(f"image file not found: {text[:300]}")
        where = "" if allow_local_files else " (local file paths are not accepted here)"
        raise ImageError(f"could not interpret the string as an image{where}; expected {_ACCEPTED}")
    return decode_image_bytes(data, **kw)


def preprocess(image: Image.Image, size: int = IMAGE_SIZE, mean: tuple[float, ...] = CLIP_MEAN,
               std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> [3, size, size] float32, in exactly the original's operation order and precision."""
    if image.mode != "RGB":
        image = to_rgb(image)
    # PIL returns a copy when the size already matches, like torchvision's Resize does.
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = pixels.to(torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub(m).div(s)


def image_to_tensor(source: TensorOrImage, *, size: int = IMAGE_SIZE, **load_kwargs) -> torch.Tensor:
    """Any image input -> [1, 3, size, size]. Preprocessed tensors pass through (follow-up chat turns)."""
    if isinstance(source, torch.Tensor):
        t = source.unsqueeze(0) if source.dim() == 3 else source
        if t.dim() != 4 or tuple(t.shape) != (1, 3, size, size):
            raise ImageError(f"an image tensor must have shape [3, {size}, {size}] or [1, 3, {size}, {size}], "
                             f"got {list(source.shape)}")
        if not t.is_floating_point():
            raise ImageError(f"an image tensor must be preprocessed floats, got dtype {t.dtype}")
        return t
    return preprocess(load_image(source, **load_kwargs), size=size).unsqueeze(0)


def image_hash(tensor: torch.Tensor) -> str:
    """Stable sha256 of a tensor's dtype, shape and bytes: the key for caching image embeddings."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Transparency is composited on WHITE: PIL's plain convert("RGB") drops
    alpha and exposes whatever colour hides under transparent pixels (usually black), which the model
    would see as a black background that the user never saw."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth greyscale to 8 bits (PIL's own convert("L") clips 16-bit data to white)."""
    if mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        if a.size and a.max() <= 1.0:  # float images are conventionally in [0, 1]
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    if mode == "I" and (a.size == 0 or a.max() <= 255):  # 32-bit container holding 8-bit values
        return np.clip(a, 0, 255).astype(np.uint8)
    a = np.clip(a, 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def _finish(img: Image.Image, max_pixels: int, exif_transpose: bool) -> Image.Image:
    """Size check (before decoding), full decode, orientation, RGB."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                         "(possible decompression bomb)")
    try:
        img.load()  # force the full decode so truncated/corrupt data fails here
        if exif_transpose and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageError(f"corrupt or truncated image data: {type(e).__name__}: {e}") from e
    return to_rgb(img)


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageError(f"image file {path} is {size} bytes, more than max_bytes={max_bytes}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise ImageNotFoundError(f"image file not found: {path}") from e
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {e}") from e


def _b64decode(text: str, max_bytes: int) -> bytes | None:
    """Strict base64 (standard or URL-safe alphabet, whitespace ignored); None if it is not base64."""
    compact = re.sub(r"\s+", "", text)
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"base64 image is larger than max_bytes={max_bytes}")
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _parse_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("malformed data URL: no ',' separating header and data")
    params = [p.strip().lower() for p in header[5:].split(";")]
    if params[0] and not params[0].startswith("image/") and params[0] != "application/octet-stream":
        raise ImageError(f"data URL media type must be image/*, got {params[0]!r}")
    if "base64" in params[1:]:
        data = _b64decode(payload, max_bytes)
        if data is None:
            raise ImageError("data URL payload is not valid base64")
        return data
    return urllib.parse.unquote_to_bytes(payload)


def _download(url: str, max_bytes: int, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "visualglm-image-loader"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"remote image is {length} bytes, more than max_bytes={max_bytes}")
            data = resp.read(max_bytes + 1)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"could not download image from {url}: {e}") from e
    if len(data) > max_bytes:
        raise ImageError(f"remote image is larger than max_bytes={max_bytes}")
    return data


def _looks_like_path(text: str) -> bool:
    return len(text) < 1024 and "\n" not in text and (
        bool(re.search(r"[/\\]|\.[A-Za-z0-9]{2,5}$", text)) or text.startswith("~"))


def _has_image_magic(data: bytes) -> bool:
    """Whether base64-decoded bytes plausibly start an image (so 'abcd/efgh' is treated as a path)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)):
                return True
    except Image.DecompressionBombError:
        return True
    except Exception:
        return False
