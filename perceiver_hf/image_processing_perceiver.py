"""Image processor of Perceiver IO image models: PIL/NumPy based, no torchvision needed.

`PerceiverImageProcessor` turns PIL images, NumPy arrays or torch tensors into the `pixel_values`
`(B, C, H, W)` float32 batch that `PerceiverForImageClassification` takes: optional grayscale or RGB
conversion, optional center crop, resize, rescale (to [0, 1]) and normalize. It is registered with
`AutoImageProcessor` for `PerceiverConfig`, so `save_pretrained` beside a model makes
`pipeline("image-classification", model=<dir>)` work.

Pillow is optional (`pip install "perceiver-hf[vision]"`): without it NumPy arrays and torch tensors are
still processed, resized with torch's antialiased interpolation instead of Pillow's (the same filter,
up to rounding: Pillow works on 8-bit pixels), while what only Pillow can do (decoding image files,
Pillow-only resampling filters) raises an `ImportError` that says what to install.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    SizeDict,
    infer_channel_dimension_format,
    is_pil_image,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_vision_available

if is_vision_available():
    import PIL.Image
    from transformers.image_transforms import convert_to_rgb as _pil_convert_to_rgb
    from transformers.image_utils import PILImageResampling
else:

    class PILImageResampling(enum.IntEnum):
        """Stand-in for `PIL.Image.Resampling` where Pillow is not installed (same names and values, so
        saved `resample` settings mean the same with and without Pillow)."""

        NEAREST = 0
        LANCZOS = 1
        BILINEAR = 2
        BICUBIC = 3
        BOX = 4
        HAMMING = 5


__all__ = ["PerceiverImageProcessor", "PerceiverImageProcessorKwargs"]

PILLOW_MISSING = (
    'Pillow is not installed; install it with `pip install pillow` (or `pip install "perceiver-hf[vision]"`)'
)

# Pillow's filters that torch's `interpolate` has too (antialiased like Pillow's when downsampling).
_TORCH_MODES = {
    PILImageResampling.NEAREST: ("nearest-exact", False),
    PILImageResampling.BILINEAR: ("bilinear", True),
    PILImageResampling.BICUBIC: ("bicubic", True),
}


def require_pillow(what: str) -> None:
    """Raise an `ImportError` naming what to install where Pillow is missing."""
    if not is_vision_available():
        raise ImportError(f"{what} needs Pillow. {PILLOW_MISSING}.")


def _convert_to_rgb(image: Any, input_data_format: str | ChannelDimension | None = None) -> np.ndarray:
    """3-channel RGB, transparency composited onto white: transformers' conversion where Pillow is
    installed, its NumPy branch (the same arithmetic) where it is not. Returns an array in the input's layout."""
    if is_vision_available():
        return _pil_convert_to_rgb(image, return_numpy=True, input_data_format=input_data_format)
    image = np.asarray(image)
    if input_data_format is None:
        input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
    channel_axis = -1 if ChannelDimension(input_data_format) == ChannelDimension.LAST else 0
    image = np.moveaxis(image, channel_axis, -1)
    num_channels = image.shape[-1]
    if num_channels == 1:
        rgb = np.repeat(image, 3, axis=-1)
    elif num_channels == 4:
        if np.issubdtype(image.dtype, np.floating) and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                "The image to be converted to RGB contains values outside the range [0, 1], "
                f"got [{image.min()}, {image.max()}]."
            )
        white = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = image[..., 3:4] / white
        composite = alpha * image[..., :3] + (1 - alpha) * white
        rgb = np.round(composite).astype(image.dtype) if white == 255 else composite.astype(image.dtype)
    else:
        rgb = image
    return np.moveaxis(rgb, -1, channel_axis)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` of a channels-first array (zero-padded where the image is smaller), which
    transformers refuses to run without Pillow although it is NumPy only."""
    orig_height, orig_width = image.shape[-2:]
    top, left = (orig_height - height) // 2, (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return image[..., top : top + height, left : left + width]
    new_height, new_width = max(height, orig_height), max(width, orig_width)
    top_pad, left_pad = math.ceil((new_height - orig_height) / 2), math.ceil((new_width - orig_width) / 2)
    padded = np.zeros_like(image, shape=image.shape[:-2] + (new_height, new_width))
    padded[..., top_pad : top_pad + orig_height, left_pad : left_pad + orig_width] = image
    top, left = top + top_pad, left + left_pad
    return padded[..., max(0, top) : min(new_height, top + height), max(0, left) : min(new_width, left + width)]


def _torch_resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a channels-first array with torch (Pillow's filters, antialiased when downsampling).
    Integer images come back rounded to their dtype, as from Pillow."""
    try:
        mode, antialias = _TORCH_MODES[PILImageResampling(resample)]
    except (KeyError, ValueError):
        raise ImportError(
            f"resample={resample!r} is a Pillow-only filter (torch has nearest, bilinear and bicubic). "
            f"{PILLOW_MISSING}."
        ) from None
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    kwargs = {"antialias": antialias, "align_corners": False} if mode != "nearest-exact" else {}
    resized = F.interpolate(pixels, size=size, mode=mode, **kwargs)[0].numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.round(resized), info.min, info.max).astype(image.dtype)
    return resized.astype(image.dtype, copy=False)


# ITU-R 601-2 luma weights, the ones PIL's `convert("L")` uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


class PerceiverImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus `do_convert_grayscale`.

    do_convert_grayscale (`bool`, *optional*):
        Whether to convert images to one luminance channel (for grayscale models such as MNIST's).
    """

    do_convert_grayscale: bool | None


class PerceiverImageProcessor(PilBackend):
    r"""Image processor for Perceiver IO image models (PIL/NumPy backend).

    Processing order: grayscale or RGB conversion, center crop, resize, rescale, normalize. The output
    is `pixel_values` `(batch, channels, height, width)` float32.

    Args:
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Convert images to 3-channel RGB (alpha composited onto white). Set `False` for grayscale models.
        do_convert_grayscale (`bool`, *optional*, defaults to `False`):
            Convert images to one luminance channel. Cannot be combined with `do_convert_rgb`.
        do_center_crop (`bool`, *optional*, defaults to `False`):
            Crop the image's centre before resizing, the way DeepMind's ImageNet models were evaluated (and
            transformers' `PerceiverImageProcessor` does): the crop is `size / crop_size` of the image's
            shorter side, so 224 / 256 keeps the central 87.5%, whatever the image's size.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 256, "width": 256}`):
            The reference size of that ratio (not an output size in pixels).
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize to `size`.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Output size.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resampling filter of the resize.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Multiply the pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Scale factor of the rescale.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Subtract `image_mean` and divide by `image_std`, per channel.
        image_mean / image_std (`float` or `list[float]`, *optional*, default to ImageNet's):
            One value per channel (or one for all).

    Example:

    ```python
    >>> from perceiver_hf import PerceiverConfig, PerceiverImageProcessor
    >>> config = PerceiverConfig(input_adapter="image", image_size=[28, 28], num_channels=1)
    >>> processor = PerceiverImageProcessor.from_perceiver_config(config)
    >>> processor(images=[pil_image], return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 1, 28, 28])
    ```
    """

    valid_kwargs = PerceiverImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    crop_size = {"height": 256, "width": 256}
    do_center_crop = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_convert_grayscale = False

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("do_convert_grayscale") and kwargs.get("do_convert_rgb", type(self).do_convert_rgb):
            if "do_convert_rgb" in kwargs:
                raise ValueError("do_convert_grayscale=True and do_convert_rgb=True exclude each other; set one")
            # Asking for grayscale turns the RGB default off.
            kwargs["do_convert_rgb"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_perceiver_config(cls, config: Any, **kwargs: Any) -> PerceiverImageProcessor:
        """An image processor that fits an image `PerceiverConfig`: `size` from `config.image_size`,
        grayscale conversion for 1 channel and RGB conversion for 3, and per-channel mean/std
        (ImageNet's for 3 channels, 0.5 otherwise, mapping [0, 1] to [-1, 1]). `kwargs` override."""
        num_channels = config.num_channels
        height, width = config.image_size
        defaults: dict[str, Any] = {
            "size": {"height": height, "width": width},
            "do_convert_rgb": num_channels == 3,
            "do_convert_grayscale": num_channels == 1,
        }
        if num_channels != 3:
            defaults["image_mean"] = [0.5] * num_channels
            defaults["image_std"] = [0.5] * num_channels
        return cls(**(defaults | kwargs))

    @staticmethod
    def convert_to_grayscale(
        image: PIL.Image.Image | np.ndarray, input_data_format: str | ChannelDimension | None = None
    ) -> PIL.Image.Image | np.ndarray:
        """One luminance channel: PIL `"L"` mode, or a `(height, width)` array of the input's dtype.

        Transparent pixels are composited onto white first, as in RGB conversion.
        """
        if is_pil_image(image):  # (so Pillow is installed)
            if image.mode in ("L", "I", "I;16", "F"):  # already single-channel
                return image
            return PIL.Image.fromarray(_convert_to_rgb(image)).convert("L")
        if not isinstance(image, np.ndarray):
            image = np.asarray(image)
        if image.ndim == 2:
            return image
        if image.ndim != 3:
            raise ValueError(f"images must have 2 or 3 dimensions, got an array of shape {image.shape}")
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
            image = np.moveaxis(image, 0, -1)  # (H, W, C)
        num_channels = image.shape[-1]
        if num_channels == 1:
            return image[..., 0]
        if num_channels == 4:
            image = _convert_to_rgb(image, input_data_format=ChannelDimension.LAST)
        elif num_channels != 3:
            raise ValueError(f"cannot convert an image with {num_channels} channels to grayscale (expected 1, 3 or 4)")
        luma = image.astype(np.float64) @ _LUMA_WEIGHTS
        if np.issubdtype(image.dtype, np.integer):
            return np.clip(np.round(luma), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max).astype(image.dtype)
        return luma.astype(image.dtype)

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        do_convert_grayscale: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """One raw image (PIL, NumPy or torch) -> a channels-first NumPy array."""
        if do_convert_grayscale:
            if do_convert_rgb:
                raise ValueError("do_convert_grayscale=True and do_convert_rgb=True exclude each other; set one")
            if not (is_pil_image(image) or isinstance(image, np.ndarray)):
                image = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
            image = self.convert_to_grayscale(image, input_data_format)
            input_data_format = None  # a (height, width) array or single-channel PIL image now
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

    def convert_to_rgb(self, image: np.ndarray, input_data_format: str | ChannelDimension | None = None) -> np.ndarray:
        """3-channel RGB, transparency composited onto white (with or without Pillow for arrays)."""
        return _convert_to_rgb(image, input_data_format=input_data_format)

    def resize(self, image: np.ndarray, size: SizeDict, resample: int | None = None, **kwargs: Any) -> np.ndarray:
        """Resize a channels-first array: with Pillow as transformers' PIL backend does, without it with torch
        (nearest, bilinear or bicubic, antialiased when downsampling; other filters need Pillow)."""
        if is_vision_available():
            return super().resize(image, size, resample=resample, **kwargs)
        resample = PILImageResampling.BILINEAR if resample is None else resample
        if size.height and size.width:
            new_size = (size.height, size.width)
        elif size.shortest_edge and not size.longest_edge:
            new_size = get_resize_output_image_size(
                image, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        else:
            raise ImportError(f"Resizing to {dict(size)} needs Pillow. {PILLOW_MISSING}.")
        return _torch_resize(image, tuple(new_size), resample)

    def center_crop(self, image: np.ndarray, size: SizeDict, crop_size: SizeDict, **kwargs: Any) -> np.ndarray:
        """The central `(size / crop_size) * min(height, width)` pixels of a channels-first image: a crop
        relative to the image, so that the resize after it keeps the same field of view at any image size."""
        for name, value in (("size", size), ("crop_size", crop_size)):
            if value.height is None or value.width is None:
                raise ValueError(f"{name} must have 'height' and 'width' for the center crop, got {dict(value)}")
        shorter_side = min(image.shape[-2:])
        relative = SizeDict(
            height=int(size.height / crop_size.height * shorter_side),
            width=int(size.width / crop_size.width * shorter_side),
        )
        if is_vision_available():
            return super().center_crop(image, relative, **kwargs)
        return _center_crop(image, relative.height, relative.width)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_center_crop: bool = False,
        size: SizeDict | None = None,
        crop_size: SizeDict | None = None,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        # The crop comes before the resize (the base class crops after it, to an absolute size).
        if do_center_crop:
            images = [self.center_crop(image, size=size, crop_size=crop_size) for image in images]
        kwargs |= {"do_center_crop": False, "size": size, "crop_size": crop_size}
        processed = super()._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]
        # Without rescale/normalize the arrays keep the input dtype (uint8); models take float32.
        pixel_values = [np.asarray(image, dtype=np.float32) for image in processed]
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)
