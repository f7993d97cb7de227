"""The multi-modality fork's `perceiver_pytorch.multi_modality_perceiver` (`MultiModalityPerceiver`,
`MultiModalityPerceiverNoPooling`), run on this package's encoder.

Mirrors perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit
9d5e35657d7a2ffbfd6f0506b54255facf23fa9e. Same constructor arguments (keyword-only), defaults, forward signature and
return values as there. The inputs are built exactly as the fork builds them: the modalities present in the batch,
in sorted name order, each `(data, zero padding, Fourier-encoded positions, one-hot modality encoding)` along the
channels (padding to the widest modality), flattened and concatenated along the positions. The encoder is
`depth x (cross-attention -> latent transformer of num_latent_blocks_per_layer self-attention layers)` with the
fork's extra residual around each latent transformer; weight tying as the fork's `cache_by_name_fn`
(`fork_weight_sharing`); `use_gelu` chooses GELU over GEGLU feed-forwards. Then mean over latents, LayerNorm, Linear
(`MultiModalityPerceiver`), or the latents themselves (`MultiModalityPerceiverNoPooling`).

Deliberate differences:

- the parameters are named as the core's (`to_kv` split into `k_proj` / `v_proj`); `load_original_state_dict`
  loads a state dict of the original;
- a `mask` that masks out every input of an example raises a `ValueError` (the original attends uniformly).

`hierarchical_multi_modality_perceiver` is not mirrored: its latent array changes size from layer to layer, which
the core's encoder does not express.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import Identity

from ..perceiver_pytorch._translate import KeyMapEntry
from ._fork import build_fork_encoder, fork_layers_key_map, fork_weight_sharing
from .modalities import InputModality, modality_encoding
from .perceiver_pytorch import fourier_encode

__all__ = ["MultiModalityPerceiver", "MultiModalityPerceiverNoPooling", "InputModality", "modality_features"]


def modality_features(
    modality: InputModality, data: Tensor, modality_index: int, num_modalities: int
) -> tuple[Tensor, Tensor]:
    """The Fourier features of the positions of `data` `(B, *axes, C)` (on `linspace(-1, 1)` per axis) and its
    one-hot modality encoding, each `(B, *axes, channels)`, as the fork computes them."""
    b, *axis, _ = data.shape
    device = data.device
    axis_pos = [torch.linspace(-1.0, 1.0, steps=size, device=device) for size in axis]
    pos = torch.stack(torch.meshgrid(*axis_pos, indexing="ij"), dim=-1)  # (*axes, input_axis)
    enc_pos = fourier_encode(pos, modality.max_freq, modality.num_freq_bands, modality.freq_base).flatten(-2)
    modality_encodings = modality_encoding(b, axis, modality_index, num_modalities, device=device)
    return enc_pos.expand(b, *enc_pos.shape), modality_encodings


class MultiModalityPerceiver(nn.Module):
    """The fork's `MultiModalityPerceiver`: a dict `{name: (B, *axes, C)}` of the modalities given to the
    constructor (any subset) -> class logits `(B, num_classes)`. `mask` `(B, N)` over all the inputs' positions
    (in sorted modality order): True for inputs to attend to. Subclasses may override `pool`."""

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = False,
    ) -> None:
        super().__init__()
        modalities = list(modalities)
        self.modalities = {modality.name: modality for modality in modalities}
        # One one-hot channel per modality, after the widest modality's channels.
        self.max_modality_dim = max(modality.input_dim for modality in modalities) + len(modalities)
        cross_sharing, self_sharing = fork_weight_sharing(depth, num_latent_blocks_per_layer, weight_tie_layers)
        self.encoder = build_fork_encoder(
            input_dim=self.max_modality_dim,
            cross_sharing=cross_sharing,
            self_sharing=self_sharing,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            use_gelu=use_gelu,
            block_residual=True,
        )
        self.to_logits = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))

    @property
    def latents(self) -> nn.Parameter:
        """The latent array `(num_latents, latent_dim)` (the original's `latents`)."""
        return self.encoder.latent

    def forward(self, multi_modality_data: dict[str, Tensor], mask: Tensor | None = None) -> Tensor:
        batch_sizes = set()
        num_modalities = len(multi_modality_data)
        linearized_data = []
        for modality_index, modality_name in enumerate(sorted(multi_modality_data.keys())):
            assert modality_name in self.modalities, f"modality {modality_name} was not defined in constructor"
            data = multi_modality_data[modality_name]
            modality = self.modalities[modality_name]
            b, *axis, _ = data.shape
            assert len(axis) == modality.input_axis, (
                f"input data must have the right number of  for modality {modality_name}. "
                f"Expected {modality.input_axis} while forward argument offered {len(axis)}"
            )
            batch_sizes.add(b)
            assert len(batch_sizes) == 1, "batch size must be the same across all modalities"

            enc_pos, modality_encodings = modality_features(modality, data, modality_index, num_modalities)
            # Zero channels pad this modality to the widest one (the one-hot has one channel per modality given).
            padding_size = self.max_modality_dim - modality.input_dim - num_modalities
            padding = torch.zeros(size=data.size()[0:-1] + (padding_size,)).to(data.device)
            data = torch.cat((data, padding, enc_pos, modality_encodings), dim=-1)
            linearized_data.append(data.reshape(b, -1, data.shape[-1]))

        data = torch.cat(linearized_data, dim=1)  # (B, N, max_modality_dim)
        if mask is not None:
            mask = mask.reshape(data.shape[0], -1)
        x = self.encoder(data, attention_mask=mask).last_hidden_state  # (B, L, D)
        x = self.pool(x)
        return self.to_logits(x)

    def pool(self, x: Tensor) -> Tensor:
        """Pooling over the latents `(B, L, D)`: their mean `(B, D)`."""
        return x.mean(dim=-2)

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        return fork_layers_key_map(self.encoder) + [("to_logits.", "to_logits.", None)]


class MultiModalityPerceiverNoPooling(MultiModalityPerceiver):
    """The fork's `MultiModalityPerceiverNoPooling`: returns the latents `(B, num_latents, latent_dim)` (no pooling,
    no head). Note the default `use_gelu=True`, as in the fork."""

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = True,
    ) -> None:
        super().__init__(
            modalities=modalities,
            depth=depth,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers,
            num_latent_blocks_per_layer=num_latent_blocks_per_layer,
            use_gelu=use_gelu,
            num_classes=1,
        )
        self.to_logits = Identity()

    def pool(self, x: Tensor) -> Tensor:
        """No pooling: the latents `(B, L, D)`."""
        return x
