"""Small images built in memory for tests, encoded the way clients send them."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def encode(image: Image.Image, image_format: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def asymmetric(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An image unlike its every flip and rotation: a colour gradient and a corner mark."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [(x * 255 // width, y * 255 // height, 90) for y in range(height) for x in range(width)]
    )
    image.paste((255, 255, 255), (0, 0, width // 4, height // 5))
    return image


def with_orientation(upright: Image.Image, orientation: int) -> bytes:
    """PNG bytes whose EXIF orientation tag, applied, gives back `upright`."""
    stored = {
        1: upright,
        2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: upright.transpose(Image.Transpose.ROTATE_180),
        4: upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: upright.transpose(Image.Transpose.TRANSPOSE),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        7: upright.transpose(Image.Transpose.TRANSVERSE),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "PNG", exif=exif)


def upload_variety() -> dict[str, tuple[bytes, str]]:
    """Real shapes images in several sizes, formats and modes: name -> (file bytes, media type)."""
    from model_export import shapes

    photo, _ = shapes.render(seed=424242, index=3)
    big = photo.resize((640, 480))
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    return {
        "jpeg": (shapes.sample(424242, 0).data, "image/jpeg"),
        "jpeg-640x480": (encode(big, "JPEG", quality=90), "image/jpeg"),
        "png-rgba": (encode(rgba, "PNG"), "image/png"),
        "gif-palette": (encode(photo.convert("P"), "GIF"), "image/gif"),
        "webp": (encode(photo, "WEBP", quality=80), "image/webp"),
        "bmp-grey": (encode(photo.convert("L"), "BMP"), "image/bmp"),
        "tiff-cmyk": (encode(photo.convert("CMYK"), "TIFF"), "image/tiff"),
    }
