"""The multi-modality fork's `perceiver_pytorch.multi_modality_with_text_perceiver` (`MultiModalityWithTextPerceiver`),
run on this package's encoder.

Mirrors perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit
9d5e35657d7a2ffbfd6f0506b54255facf23fa9e. As `MultiModalityPerceiver`, except: modalities with an `embedding`
(token ids `(B, L, 1)`) are embedded, and cross-attention layer `i` sees the `i`-th of `depth` equal slices of the
embedding channels (`InputModalityWithEmbedding.embedding_for_layer`); every modality is padded to the widest
per-layer width. The core encoder takes one input array per cross-attention layer. GEGLU feed-forwards only (the
fork has no `use_gelu` here). The embeddings are registered in `embeddings`, keyed by modality name, as in the fork.

Deliberate differences: the parameters are named as the core's (`load_original_state_dict` loads a state dict of
the original); a `mask` that masks out every input of an example raises a `ValueError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import ModuleDict

from ..perceiver_pytorch._translate import EncoderMirror, KeyMapEntry
from ._fork import build_multi_modality_encoder, fork_layers_key_map
from .modalities import InputModalityWithEmbedding
from .multi_modality_perceiver import modality_inputs

__all__ = ["MultiModalityWithTextPerceiver"]


class MultiModalityWithTextPerceiver(EncoderMirror):
    """The fork's `MultiModalityWithTextPerceiver`: a dict `{name: (B, *axes, C)}` (token ids `(B, L, 1)` for
    modalities with an embedding) -> class logits `(B, num_classes)`."""

    def __init__(
        self,
        *,
        modalities: Iterable[InputModalityWithEmbedding],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 6,
    ) -> None:
        super().__init__()
        modalities = list(modalities)
        self.depth = depth
        self.modalities = {modality.name: modality for modality in modalities}
        # Registered here, so that they are trained, saved and moved with the model.
        self.embeddings = ModuleDict(
            {
                modality.name: modality.embedding
                for modality in modalities
                if hasattr(modality, "embedding") and modality.embedding
            }
        )
        # One one-hot channel per modality, after the widest modality's per-layer channels.
        self.max_modality_dim = max(modality.embedding_dim(self.depth) for modality in modalities) + len(modalities)
        self.encoder = build_multi_modality_encoder(locals(), input_dim=self.max_modality_dim, use_gelu=False)
        self.to_logits = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))

    def forward(self, multi_modality_data: dict[str, Tensor], mask: Tensor | None = None) -> Tensor:
        linearized_data_per_layer: list[list[Tensor]] = [[] for _ in range(self.depth)]
        # Every modality is padded to the widest per-layer width.
        layer_dim = partial(InputModalityWithEmbedding.embedding_dim, depth=self.depth)
        for modality, data, features in modality_inputs(
            self.modalities, multi_modality_data, layer_dim, self.max_modality_dim
        ):
            if modality.name in self.embeddings:
                # The registered embedding (moved, loaded or replaced with the model) is the one to use.
                modality.embedding = self.embeddings[modality.name]
            data = modality.maybe_embed(data)
            for i in range(self.depth):
                layer_data = torch.cat((modality.embedding_for_layer(data, i, self.depth), features), dim=-1)
                linearized_data_per_layer[i].append(layer_data.reshape(data.shape[0], -1, layer_data.shape[-1]))

        # Cross-attention layer i attends to its own array (the same positions, its slice of the embeddings).
        layer_inputs = [torch.cat(layer_data, dim=1) for layer_data in linearized_data_per_layer]
        x = self.encode(layer_inputs, mask)  # (B, L, D)
        return self.to_logits(x.mean(dim=-2))

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        return fork_layers_key_map(self.encoder) + [
            ("to_logits.", "to_logits.", None),
            ("embeddings.", "embeddings.", None),
        ]
