"""Position encodings for Perceiver input adapters.

Fourier features follow DeepMind's Perceiver IO (`generate_fourier_features`): positions on a grid
in [-1, 1] per axis, `num_bands` frequencies linearly spaced from 1 to `max_frequency / 2` per axis,
sine and cosine of `pi * position * frequency`, with the raw positions concatenated in front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["fourier_features", "FourierPositionEncoding", "LearnedPositionEncoding"]


def fourier_features(
    spatial_shape: Sequence[int],
    num_frequency_bands: int,
    max_frequencies: Sequence[float] | None = None,
    include_positions: bool = True,
    sine_only: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fourier position features of a grid.

    Args:
        spatial_shape: grid size per axis, e.g. `(height, width)`.
        num_frequency_bands: frequencies per axis.
        max_frequencies: highest resolution per axis; the top frequency is half of it (the Nyquist
            frequency). Defaults to `spatial_shape`.
        include_positions: prepend the raw positions (one channel per axis).
        sine_only: drop the cosine features.

    Returns:
        `(prod(spatial_shape), num_channels)` with
        `num_channels = D * (num_frequency_bands * (1 if sine_only else 2)) + (D if include_positions else 0)`
        for `D = len(spatial_shape)`; channel order `[positions, sin, cos]`, axis-major within each group.
    """
    if max_frequencies is None:
        max_frequencies = spatial_shape
    # Computed in float32 (then cast) so bf16/fp16 models get accurate high-frequency features.
    axes = [torch.linspace(-1.0, 1.0, steps=n, device=device, dtype=torch.float32) for n in spatial_shape]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*spatial, D)
    positions = positions.reshape(-1, len(spatial_shape))  # (N, D)
    frequencies = torch.stack(
        [
            torch.linspace(1.0, max_freq / 2.0, steps=num_frequency_bands, device=device, dtype=torch.float32)
            for max_freq in max_frequencies
        ]
    )  # (D, F)
    per_position = (positions[:, :, None] * frequencies[None]).reshape(positions.shape[0], -1)  # (N, D*F)
    if sine_only:
        features = torch.sin(math.pi * per_position)
    else:
        features = torch.cat([torch.sin(math.pi * per_position), torch.cos(math.pi * per_position)], dim=-1)
    if include_positions:
        features = torch.cat([positions, features], dim=-1)
    return features.to(dtype)


class FourierPositionEncoding(nn.Module):
    """Fourier position features, computed once per (shape, device, dtype) and cached.

    The cache is a plain dict, not a buffer: the features are a pure function of the shape, so they
    are never saved in a checkpoint and a model accepts grids of any size.

    `fixed_length` (1 axis only): positions are encoded on a fixed grid of that many positions, and an input of
    `n <= fixed_length` positions gets the first `n` of them. A sequence's features then do not depend on the
    length of the batch it is padded into (the features of a grid spanning the padded length would move every
    position whenever the batch's longest sequence changes). `None`: the grid spans the input's own shape.
    """

    def __init__(
        self,
        num_spatial_axes: int,
        num_frequency_bands: int,
        max_frequencies: Sequence[float] | None = None,
        include_positions: bool = True,
        sine_only: bool = False,
        fixed_length: int | None = None,
    ) -> None:
        super().__init__()
        if max_frequencies is not None and len(max_frequencies) != num_spatial_axes:
            raise ValueError(
                f"max_frequencies ({list(max_frequencies)}) must have one entry per spatial axis ({num_spatial_axes})"
            )
        if fixed_length is not None and num_spatial_axes != 1:
            raise ValueError(f"fixed_length applies to 1 spatial axis, got {num_spatial_axes}")
        self.num_spatial_axes = num_spatial_axes
        self.num_frequency_bands = num_frequency_bands
        self.max_frequencies = None if max_frequencies is None else tuple(float(f) for f in max_frequencies)
        self.include_positions = include_positions
        self.sine_only = sine_only
        self.fixed_length = fixed_length
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_channels(self) -> int:
        per_axis = self.num_frequency_bands * (1 if self.sine_only else 2) + (1 if self.include_positions else 0)
        return self.num_spatial_axes * per_axis

    def forward(self, spatial_shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Return `(prod(spatial_shape), num_channels)` features (not expanded over the batch)."""
        if self.fixed_length is not None:
            (n,) = spatial_shape
            return self.grid_features((self.fixed_length,), device, dtype)[:n]  # the first n of the fixed grid
        return self.grid_features(spatial_shape, device, dtype)

    def grid_features(self, spatial_shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The cached `(prod(spatial_shape), num_channels)` features of a grid spanning `spatial_shape`."""
        key = (tuple(spatial_shape), device, dtype)
        features = self._cache.get(key)
        if features is None:
            features = fourier_features(
                spatial_shape,
                self.num_frequency_bands,
                max_frequencies=self.max_frequencies or tuple(spatial_shape),
                include_positions=self.include_positions,
                sine_only=self.sine_only,
                device=device,
                dtype=dtype,
            )
            self._cache[key] = features
        return features


class LearnedPositionEncoding(nn.Module):
    """A trainable `(num_positions, num_channels)` position table."""

    def __init__(self, num_positions: int, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_positions, num_channels))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, num_positions: int) -> torch.Tensor:
        if num_positions > self.weight.shape[0]:
            raise ValueError(
                f"input length ({num_positions}) exceeds the {self.weight.shape[0]} learned positions "
                "(max_position_embeddings)"
            )
        return self.weight[:num_positions]
