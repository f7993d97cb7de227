"""krasserm's `perceiver.adapter` (early layout, commit 1e7069c): the input and output adapters of his model API.

The base classes are this package's own adapter contract (`num_input_channels`, `output_shape`). The concrete
adapters keep krasserm's features and parameter names, so his models compute what they computed there:

- `ImageInputAdapter`: channels-last images `(B, *spatial, C)` of exactly `image_shape`, with Fourier position
  features `[positions, sin, cos]` (this package's `fourier_features`, the same features) concatenated after the
  pixels; the features are a buffer named `position_encoding`.
- `TextInputAdapter`: token embedding scaled by `sqrt(num_input_channels)` plus a learned position table
  (`text_embedding`, `pos_encoding`), initialised uniformly as there.
- `ClassificationOutputAdapter` squeezes the query axis (`(B, 1, K)` -> `(B, K)`); `TextOutputAdapter` is a
  classification adapter with one query per position (`num_output_channels` defaults to `vocab_size`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import InputAdapter, OutputAdapter
from ..position_encoding import fourier_features

__all__ = [
    "InputAdapter",
    "OutputAdapter",
    "ImageInputAdapter",
    "TextInputAdapter",
    "ClassificationOutputAdapter",
    "TextOutputAdapter",
]


class ImageInputAdapter(InputAdapter):
    """Channels-last images of `image_shape` `(*spatial, C)` -> `(B, prod(spatial), C + D * (2 * F + 1))`.

    Args:
        image_shape: `(*spatial, channels)`, e.g. `(28, 28, 1)`.
        num_frequency_bands: Fourier frequency bands `F` per spatial axis (top frequency: half the axis size).
    """

    def __init__(self, image_shape: tuple[int, ...], num_frequency_bands: int) -> None:
        *spatial_shape, num_image_channels = image_shape
        num_position_channels = len(spatial_shape) * (2 * num_frequency_bands + 1)
        super().__init__(num_input_channels=num_image_channels + num_position_channels)
        self.image_shape = tuple(image_shape)
        self.spatial_shape = list(spatial_shape)
        self.num_frequency_bands = num_frequency_bands
        self.register_buffer("position_encoding", fourier_features(spatial_shape, num_frequency_bands))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *d = x.shape
        if tuple(d) != self.image_shape:
            raise ValueError(f"Input image shape {tuple(d)} different from required shape {self.image_shape}")
        x_enc = self.position_encoding.to(x.dtype).expand(b, -1, -1)  # (B, N, P)
        return torch.cat([x.reshape(b, -1, x.shape[-1]), x_enc], dim=-1)  # (B, N, C + P)


class TextInputAdapter(InputAdapter):
    """Token ids `(B, N)` -> `text_embedding(ids) * sqrt(C) + pos_encoding[:N]` `(B, N, C)`."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_input_channels: int) -> None:
        super().__init__(num_input_channels=num_input_channels)
        self.text_embedding = nn.Embedding(vocab_size, num_input_channels)
        self.pos_encoding = nn.Parameter(torch.empty(max_seq_len, num_input_channels))
        self.scale = math.sqrt(num_input_channels)
        self._init_parameters()

    def _init_parameters(self) -> None:
        with torch.no_grad():
            self.text_embedding.weight.uniform_(-0.1, 0.1)
            self.pos_encoding.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        if seq_len > self.pos_encoding.shape[0]:
            raise ValueError(
                f"input of length {seq_len} is longer than max_seq_len ({self.pos_encoding.shape[0]}) of the "
                "position encoding"
            )
        return self.text_embedding(x) * self.scale + self.pos_encoding[:seq_len]  # (B, N, C)


class ClassificationOutputAdapter(OutputAdapter):
    """Decoded queries `(B, Q, C)` -> class logits, the query axis squeezed when `num_outputs == 1`."""

    def __init__(self, num_classes: int, num_outputs: int = 1, num_output_channels: int | None = None) -> None:
        if num_output_channels is None:
            num_output_channels = num_classes
        super().__init__(output_shape=(num_outputs, num_output_channels))
        self.linear = nn.Linear(num_output_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(dim=1)


class TextOutputAdapter(ClassificationOutputAdapter):
    """One output query per position, projected to vocabulary logits `(B, max_seq_len, vocab_size)`."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_output_channels: int | None = None) -> None:
        super().__init__(num_classes=vocab_size, num_outputs=max_seq_len, num_output_channels=num_output_channels)
