"""Why an upload cannot become a tensor; the service gives each its HTTP status."""

from __future__ import annotations


class ImageError(ValueError):
    """An upload that is not an image the contract can turn into a tensor."""


class UnsupportedImageFormat(ImageError):
    """The bytes are an image format outside the allowed set, or no image at all."""


class UndecodableImage(ImageError):
    """The format is allowed but the data is corrupt or truncated."""


class TooManyPixels(ImageError):
    """The image declares more pixels than the configured limit."""


class TooExpensiveToDecode(ImageError):
    """Decoding the image overran the memory or the time its decoder may take."""
