"""The multi-modality fork's `perceiver_pytorch.modalities`: modality descriptions and the one-hot modality encoding.

Mirrors perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit
9d5e35657d7a2ffbfd6f0506b54255facf23fa9e (also in frenkiboy/perceiver-pytorch's history). These are plain data
classes and tensor helpers, kept as the original's (same fields, defaults and results).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Embedding

__all__ = ["InputModality", "InputModalityWithEmbedding", "modality_encoding"]


@dataclass
class InputModality:
    """A modality of the multi-modality perceivers: data `(B, *axes, input_channels)` under the key `name`, its
    positions Fourier-encoded with `num_freq_bands` frequencies per axis (logarithmically spaced, base
    `freq_base`, from `freq_base` to `max_freq / 2`)."""

    name: str
    input_channels: int
    input_axis: int
    num_freq_bands: int
    max_freq: float
    freq_base: int = 2

    @property
    def input_dim(self) -> int:
        """Channels of this modality's data plus its Fourier features."""
        return self.input_axis * ((self.num_freq_bands * 2) + 1) + self.input_channels


def modality_encoding(
    batch_size: int, axes, modality_index: int, num_modalities: int, device: torch.device | str = "cpu"
) -> Tensor:
    """One-hot encoding of modality `modality_index` of `num_modalities`, expanded to `(batch_size, *axes,
    num_modalities)` for concatenation to the modality's data."""
    one_hot = torch.eye(num_modalities, num_modalities, device=device)[modality_index]
    return one_hot.expand(batch_size, *axes, num_modalities)


@dataclass
class InputModalityWithEmbedding(InputModality):
    """A modality whose data may be token ids `(B, L, 1)` embedded by `embedding`; each cross-attention layer of
    `MultiModalityWithTextPerceiver` then sees its own slice of the embedding channels."""

    embedding: Embedding = None

    def embedding_dim(self, depth: int) -> int:
        """Channels one layer sees: the embedding slice plus the position features, or `input_dim` without
        embedding."""
        if not self.embedding:
            return self.input_dim
        # each layer sees a subset of the embedding output.
        pos_encoding_dim = (self.num_freq_bands * 2) + 1
        return self.embedding.embedding_dim // depth + pos_encoding_dim

    def embedding_for_layer(self, embedded: Tensor, layer_index: int, depth: int) -> Tensor:
        """Layer `layer_index`'s slice of the embedding channels of `embedded` `(B, L, D)`: `D // depth` channels
        (the data itself without embedding)."""
        if not self.embedding:
            # This modality does not require embedding, we return the features:
            return embedded
        assert self.input_axis == 1, "embedding for layer is not supported with axis !=1"
        assert embedded.dim() == 3, "embedded text tensor must have 3 dimensions: B x L x D"
        dim_per_layer = embedded.size(-1) // depth
        start_dim_index = layer_index * dim_per_layer
        end_dim_index = (layer_index + 1) * dim_per_layer
        return embedded[:, :, start_dim_index:end_dim_index]

    def maybe_embed(self, data: Tensor) -> Tensor:
        """Token ids `(B, L, 1)` -> embeddings `(B, L, D)`; other data unchanged."""
        if self.embedding:
            return self.embedding(data.squeeze(2))
        return data
