"""Optical flow input adapter: DeepMind's Perceiver IO flow preprocessing.

A pair of frames becomes one input position per pixel: the `k x k` patch around the pixel in each frame (3 x 3 in
DeepMind's model, zero "SAME" padding at the borders), both frames' patches concatenated, optionally projected by a
linear layer (DeepMind's "conv after patching", a 1x1 convolution), then 2D Fourier position features concatenated.
The same features serve as the decoder's queries (see `PerceiverForOpticalFlow`), so each output pixel is decoded
from its own patches and position.

Shapes: B batch, F frames (2), C pixel channels, H x W pixels, P = C * k * k patch values per frame,
N = H * W input positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import InputAdapter, _require_positive_int
from .position_encoding import FourierPositionEncoding

if TYPE_CHECKING:
    from .configuration_perceiver import PerceiverConfig

__all__ = ["FlowInputAdapter", "extract_patches", "NUM_FRAMES"]

NUM_FRAMES = 2  # optical flow: the first frame and the second


def extract_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The `patch_size x patch_size` patch around every pixel, with zero "SAME" padding.

    `(B, C, H, W)` -> `(B, C * patch_size**2, H, W)`, channel order `(row in patch, column in patch, channel)`, as
    TensorFlow's `extract_image_patches` that DeepMind's flow model was trained with (and the patch tensors that
    transformers' `PerceiverForOpticalFlow` takes).
    """
    b, c, h, w = images.shape
    total = patch_size - 1
    padded = F.pad(images, (total // 2, total - total // 2, total // 2, total - total // 2))
    patches = padded.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # (B, C, H, W, k, k)
    patches = patches.permute(0, 4, 5, 1, 2, 3)  # (B, k, k, C, H, W)
    return patches.reshape(b, patch_size * patch_size * c, h, w)


class FlowInputAdapter(InputAdapter):
    """Two frames -> `(B, H*W, C')` input features of DeepMind's optical flow Perceiver.

    `forward(frames)` takes frame pairs `(B, 2, C, H, W)` (or channels-last `(B, 2, H, W, C)`), as
    `PerceiverOpticalFlowProcessor` returns them; `embed_patches` takes already extracted patches
    `(B, 2, C*k*k, H, W)`, the tensor transformers' `PerceiverForOpticalFlow` takes as `inputs`.

    Args:
        image_size: the training size `(height, width)`: the Fourier frequencies' default resolution and the
            processor's tile size. Frames of any size are accepted.
        num_channels: pixel channels `C` of each frame.
        patch_size: side `k` of the patch around each pixel (DeepMind: 3).
        num_frequency_bands: Fourier frequency bands per spatial axis.
        max_frequencies: the resolution per axis whose Nyquist frequency is the highest Fourier frequency
            (`image_size` when `None`, as DeepMind's `max_resolution=train_size`).
        num_projection_channels: width of the linear layer applied to each pixel's concatenated patches
            (DeepMind's conv after patching: 64); `None`: no projection.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        num_channels: int = 3,
        patch_size: int = 3,
        num_frequency_bands: int = 64,
        max_frequencies: Sequence[float] | None = None,
        num_projection_channels: int | None = 64,
    ) -> None:
        _check_size("image_size", image_size)
        _require_positive_int("num_channels", num_channels)
        _require_positive_int("patch_size", patch_size)
        _require_positive_int("num_frequency_bands", num_frequency_bands)
        _require_positive_int("num_projection_channels", num_projection_channels, optional=True)
        max_frequencies = tuple(float(f) for f in (max_frequencies or image_size))
        position_encoding = FourierPositionEncoding(2, num_frequency_bands, max_frequencies)
        num_patch_channels = NUM_FRAMES * num_channels * patch_size**2  # both frames' patches
        num_features = num_projection_channels or num_patch_channels
        super().__init__(num_features + position_encoding.num_channels)
        self.image_size = tuple(image_size)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.num_patch_channels = num_patch_channels
        if num_projection_channels is not None:
            self.projection = nn.Linear(num_patch_channels, num_projection_channels)
        self.position_encoding = position_encoding

    config_settings: ClassVar[dict] = {
        "flow_image_size": [368, 496],
        "num_channels": 3,
        "flow_patch_size": 3,
        "num_frequency_bands": 64,
        "flow_max_frequencies": None,
        "flow_projection_channels": 64,
        "flow_rescale_factor": 100.0,
    }

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        _check_size("flow_image_size", config.flow_image_size)
        for name in ("num_channels", "flow_patch_size", "num_frequency_bands"):
            _require_positive_int(name, getattr(config, name))
        _require_positive_int("flow_projection_channels", config.flow_projection_channels, optional=True)
        frequencies = config.flow_max_frequencies
        if frequencies is not None and (
            not isinstance(frequencies, (list, tuple))
            or len(frequencies) != 2
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in frequencies)
        ):
            raise ValueError(
                f"flow_max_frequencies ({frequencies!r}) must be two positive numbers (height, width) or None"
            )
        factor = config.flow_rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"flow_rescale_factor ({factor!r}) must be a positive number")

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> FlowInputAdapter:
        return cls(
            image_size=config.flow_image_size,
            num_channels=config.num_channels,
            patch_size=config.flow_patch_size,
            num_frequency_bands=config.num_frequency_bands,
            max_frequencies=config.flow_max_frequencies,
            num_projection_channels=config.flow_projection_channels,
        )

    def frames_channels_first(self, frames: torch.Tensor, name: str = "pixel_values") -> torch.Tensor:
        """Check frame pairs `(B, 2, C, H, W)` or `(B, 2, H, W, C)` and return them as `(B, 2, C, H, W)`."""
        c = self.num_channels
        expected = f"(batch, {NUM_FRAMES}, {c}, height, width) or (batch, {NUM_FRAMES}, height, width, {c})"
        if not torch.is_tensor(frames) or frames.ndim != 5:
            got = tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__
            raise ValueError(f"{name} must be frame pairs of shape {expected}, got {got}")
        if frames.shape[1] != NUM_FRAMES:
            raise ValueError(
                f"{name} holds {frames.shape[1]} frame(s) per example (shape {tuple(frames.shape)}); optical flow "
                f"takes {NUM_FRAMES}: {expected}"
            )
        if not frames.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {frames.dtype}")
        if frames.shape[2] == c:
            result = frames
        elif frames.shape[-1] == c:
            result = frames.permute(0, 1, 4, 2, 3)
        else:
            raise ValueError(
                f"{name} of shape {tuple(frames.shape)} has no axis of {c} channels (num_channels) at position 2 "
                f"or -1; expected {expected}"
            )
        if 0 in result.shape:
            raise ValueError(
                f"{name} must hold at least one frame pair of at least 1x1 pixels, got {tuple(frames.shape)}"
            )
        return result

    def extract_patches(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame pairs `(B, 2, C, H, W)` (or channels-last) -> patches `(B, 2, C*k*k, H, W)`."""
        frames = self.frames_channels_first(frames)
        b, f, c, h, w = frames.shape
        patches = extract_patches(frames.reshape(b * f, c, h, w), self.patch_size)  # (B*2, P, H, W)
        return patches.reshape(b, f, -1, h, w)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches `(B, 2, C*k*k, H, W)` -> input features `(B, H*W, C')`."""
        per_frame = self.num_patch_channels // NUM_FRAMES
        if not torch.is_tensor(patches) or patches.ndim != 5 or tuple(patches.shape[1:3]) != (NUM_FRAMES, per_frame):
            got = tuple(patches.shape) if torch.is_tensor(patches) else type(patches).__name__
            raise ValueError(
                f"inputs (patches) must have shape (batch, {NUM_FRAMES}, {per_frame}, height, width): "
                f"{self.num_channels} channels x {self.patch_size}x{self.patch_size} patch per frame, got {got}"
            )
        b, f, p, h, w = patches.shape
        # Both frames' patches of each pixel side by side: (B, H, W, 2*P), frame-major as transformers' space_to_depth.
        x = patches.permute(0, 3, 4, 1, 2).reshape(b, h, w, f * p)
        if hasattr(self, "projection"):
            x = self.projection(x)  # (B, H, W, C)
        positions = self.position_encoding((h, w), x.device, x.dtype)  # (H*W, Pos)
        x = x.reshape(b, h * w, -1)
        return torch.cat([x, positions.expand(b, -1, -1)], dim=-1)  # (B, N, C + Pos)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame pairs `(B, 2, C, H, W)` or `(B, 2, H, W, C)` -> input features `(B, H*W, num_input_channels)`."""
        return self.embed_patches(self.extract_patches(frames))


def _check_size(name: str, size: object) -> None:
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in size)
    ):
        raise ValueError(f"{name} ({size!r}) must be two positive integers (height, width)")
