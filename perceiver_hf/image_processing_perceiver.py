"""Image processor of Perceiver IO image models: PIL/NumPy based, no torchvision needed.

`PerceiverImageProcessor` turns PIL images, NumPy arrays or torch tensors into the `pixel_values`
`(B, C, H, W)` float32 batch that `PerceiverForImageClassification` takes: optional grayscale or RGB
conversion, optional center crop, resize, rescale (to [0, 1]) and normalize. It is registered with
`AutoImageProcessor` for `PerceiverConfig`, so `save_pretrained` beside a model makes
`pipeline("image-classification", model=<dir>)` work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs

__all__ = ["PerceiverImageProcessor", "PerceiverImageProcessorKwargs"]

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
        if isinstance(image, PIL.Image.Image):
            if image.mode in ("L", "I", "I;16", "F"):  # already single-channel
                return image
            return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True)).convert("L")
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
            image = convert_to_rgb(image, return_numpy=True, input_data_format=ChannelDimension.LAST)
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
            if not isinstance(image, (PIL.Image.Image, np.ndarray)):
                image = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
            image = self.convert_to_grayscale(image, input_data_format)
            input_data_format = None  # a (height, width) array or single-channel PIL image now
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

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
        return super().center_crop(image, relative, **kwargs)

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
