"""Images in and out of the API. In: raw base64 or a ``data:image/...;base64,`` URL (remote URLs and
file paths are refused: the server reads nothing a request names), checked by its header's size
before its pixels are decoded, so a decompression bomb is refused without being unpacked. Out: raw
base64 PNG (no ``data:`` prefix, as AUTOMATIC1111 sends it) carrying the ``parameters`` text chunk,
so ``png-info`` on a returned image gives its settings back."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, PngImagePlugin

MAX_IMAGE_BYTES = 48 << 20  # one decoded image file
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
_DATA_URL = re.compile(r"^data:([\w/+.-]*)((?:;[\w=.-]+)*),", re.ASCII)
_BASE64 = re.compile(rb"^[A-Za-z0-9+/\s_-]*={0,2}\s*$")


class ImageInputError(ValueError):
    """An image a request sent cannot be used; ``status`` is the HTTP status (400, or 413 when too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data, what: str = "the image") -> Image.Image:
    """The picture of a base64 string or data URL, loaded; ImageInputError for anything else."""
    if not isinstance(data, str) or not data.strip():
        raise ImageInputError(f"{what} is missing: send it as base64 or a data:image/png;base64,... URL")
    text = data.strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE) or text.startswith(("/", "~", "file:")):
        raise ImageInputError(f"{what} must be the image itself (base64 or a data URL); URLs and file paths are not "
                              "read by this server")
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if not match or ";base64" not in match.group(2):
            raise ImageInputError(f"{what} is a data URL that is not base64 (expected data:image/png;base64,...)")
        text = text[match.end():]
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ImageInputError(f"{what} is larger than {MAX_IMAGE_BYTES >> 20} MB", status=413)
    raw = text.encode("ascii", "replace")
    if not _BASE64.match(raw):
        raise ImageInputError(f"{what} is not valid base64")
    try:
        blob = base64.b64decode(raw + b"=" * (-len(raw.strip()) % 4), altchars=b"-_" if b"-" in raw or b"_" in raw else None)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{what} is not valid base64") from None
    return open_image(blob, what)


def open_image(blob: bytes, what: str) -> Image.Image:
    """Open an image file's bytes, refusing by its header a picture too large to decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
            width, height = image.size
            if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                raise ImageInputError(f"{what} is {width}x{height} px; at most {MAX_IMAGE_SIDE} px a side and "
                                      f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels are taken", status=413)
            image.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"{what} is too large to decode ({error})", status=413) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{what} is not an image this server can read ({error})") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Raw base64 of a PNG of ``image`` with its ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def as_mask(image: Image.Image) -> Image.Image:
    """AUTOMATIC1111's reading of a mask: the alpha channel where the picture has transparency, else
    its grey levels; white is the part to redraw."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")
