"""Input and output adapters: the task-specific ends of a Perceiver IO model.

The contract (one for every modality and task):

- An **input adapter** maps raw inputs to a `(batch, positions, channels)` array and declares
  `num_input_channels`, the `channels` of that array. The encoder cross-attends from its latents to it.
- An **output adapter** declares `output_shape = (num_queries, num_query_channels)`, the shape of the
  decoder's output queries, and maps the decoder output `(batch, num_queries, num_query_channels)` to
  task outputs (logits). The decoder owns a trainable query array of that shape; a caller may pass
  other queries instead (masked LM passes the queries of the input positions).

Shapes: B batch, N input positions, C channels, Q output queries, V vocabulary, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .position_encoding import FourierPositionEncoding, LearnedPositionEncoding

__all__ = [
    "InputAdapter",
    "OutputAdapter",
    "TextInputAdapter",
    "ImageInputAdapter",
    "TextOutputAdapter",
    "ClassificationOutputAdapter",
]


class InputAdapter(nn.Module):
    """Base class of input adapters: `forward(inputs) -> (B, N, num_input_channels)`."""

    def __init__(self, num_input_channels: int) -> None:
        super().__init__()
        self.num_input_channels = num_input_channels


class OutputAdapter(nn.Module):
    """Base class of output adapters: decoder output `(B, Q, C)` -> task outputs.

    `output_shape` is `(Q, C)`, the shape of the decoder's trainable output queries.
    """

    def __init__(self, output_shape: tuple[int, int]) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)


class TextInputAdapter(InputAdapter):
    """Token embeddings plus learned position embeddings.

    Args:
        vocab_size: number of token ids.
        max_seq_len: number of learned positions; longer inputs raise a `ValueError`.
        num_input_channels: embedding width.
    """

    def __init__(self, vocab_size: int, max_seq_len: int, num_input_channels: int) -> None:
        super().__init__(num_input_channels)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, num_input_channels)
        self.position_embedding = LearnedPositionEncoding(max_seq_len, num_input_channels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        seq_len = input_ids.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"input_ids has length {seq_len}, longer than the model's {self.max_seq_len} positions "
                "(max_position_embeddings); truncate the input"
            )
        return self.token_embedding(input_ids) + self.position_embedding(seq_len)  # (B, N, C)


class ImageInputAdapter(InputAdapter):
    """Pixels with Fourier (or learned) position features concatenated along the channels.

    Accepts channels-last `(B, H, W, C)` images, as the original Perceiver IO library, and
    channels-first `(B, C, H, W)` `pixel_values`, as transformers' image processors produce. Fourier
    features are cached per shape and device, and also serve images of other sizes than configured.

    Args:
        image_shape: configured `(height, width, channels)`.
        num_frequency_bands: Fourier frequency bands per spatial axis.
        max_frequencies: highest frequency per axis (the configured size when `None`: the Nyquist
            frequency of the configured grid).
        position_encoding: `"fourier"` or `"learned"` (learned positions fix the image size).
        num_position_channels: width of learned position embeddings.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_frequency_bands: int = 32,
        max_frequencies: Sequence[float] | None = None,
        position_encoding: str = "fourier",
        num_position_channels: int = 258,
    ) -> None:
        if len(image_shape) != 3:
            raise ValueError(f"image_shape ({tuple(image_shape)}) must be (height, width, channels)")
        *spatial_shape, num_image_channels = image_shape
        if position_encoding == "fourier":
            if max_frequencies is None:
                max_frequencies = spatial_shape
            encoding: nn.Module = FourierPositionEncoding(len(spatial_shape), num_frequency_bands, max_frequencies)
            num_position_channels = encoding.num_channels
        elif position_encoding == "learned":
            encoding = LearnedPositionEncoding(spatial_shape[0] * spatial_shape[1], num_position_channels)
        else:
            raise ValueError(f"position_encoding ({position_encoding!r}) must be 'fourier' or 'learned'")
        super().__init__(num_image_channels + num_position_channels)
        self.image_shape = tuple(image_shape)
        self.spatial_shape = tuple(spatial_shape)
        self.num_image_channels = num_image_channels
        self.position_encoding_type = position_encoding
        self.position_encoding = encoding

    def to_channels_last(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` or `(B, C, H, W)` -> `(B, H, W, C)`."""
        c = self.num_image_channels
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (batch, height, width, {c}) or (batch, {c}, height, width), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating point tensor, got dtype {images.dtype}")
        if images.shape[-1] == c:
            return images
        if images.shape[1] == c:
            return images.permute(0, 2, 3, 1)
        raise ValueError(
            f"images of shape {tuple(images.shape)} have no axis of {c} channels at position 1 or -1 "
            f"(expected (batch, height, width, {c}) or (batch, {c}, height, width))"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.to_channels_last(images)  # (B, H, W, C)
        b, *spatial_shape, c = images.shape
        if self.position_encoding_type == "fourier":
            positions = self.position_encoding(spatial_shape, images.device, images.dtype)  # (H*W, P)
        else:
            if tuple(spatial_shape) != self.spatial_shape:
                raise ValueError(
                    f"images of size {tuple(spatial_shape)} do not match the learned positions of size "
                    f"{self.spatial_shape}; use Fourier position encoding for variable sizes"
                )
            positions = self.position_encoding(spatial_shape[0] * spatial_shape[1])
        pixels = images.reshape(b, -1, c)  # (B, H*W, C)
        return torch.cat([pixels, positions.expand(b, -1, -1)], dim=-1)  # (B, H*W, C + P)


class TextOutputAdapter(OutputAdapter):
    """Projects each decoded position to vocabulary logits `(B, Q, V)`.

    `linear.weight` may be tied to the input token embedding (transformers does so when
    `config.tie_word_embeddings`).
    """

    def __init__(self, vocab_size: int, max_seq_len: int, num_output_channels: int) -> None:
        super().__init__((max_seq_len, num_output_channels))
        self.linear = nn.Linear(num_output_channels, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # (B, Q, V)


class ClassificationOutputAdapter(OutputAdapter):
    """Maps `num_outputs` decoded queries to class logits: `(B, K)` for one query, else `(B, Q, K)`.

    Args:
        num_classes: number of classes `K`.
        num_outputs: number of output queries `Q`.
        num_output_channels: width of the output queries (`num_classes` when `None`).
    """

    def __init__(self, num_classes: int, num_outputs: int = 1, num_output_channels: int | None = None) -> None:
        if num_output_channels is None:
            num_output_channels = num_classes
        super().__init__((num_outputs, num_output_channels))
        self.linear = nn.Linear(num_output_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)  # (B, Q, K)
        return logits.squeeze(1) if self.output_shape[0] == 1 else logits
