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

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import Identity

from ..perceiver_pytorch._translate import EncoderMirror, KeyMapEntry
from ..perceiver_pytorch.perceiver_pytorch import position_features
from ._fork import build_multi_modality_encoder, fork_layers_key_map
from .modalities import InputModality, modality_encoding
from .perceiver_pytorch import fourier_encode

__all__ = ["MultiModalityPerceiver", "MultiModalityPerceiverNoPooling", "InputModality", "modality_inputs"]


def modality_inputs(
    modalities: Mapping[str, InputModality],
    multi_modality_data: Mapping[str, Tensor],
    modality_dim: Callable[[InputModality], int],
    max_modality_dim: int,
) -> Iterator[tuple[InputModality, Tensor, Tensor]]:
    """The fork's multi-modality inputs, checked as the fork checks them: for each modality in the batch, in sorted
    name order, `(modality, data, features)` where `features` `(B, *axes, F)` are the channels that follow the
    modality's own (`modality_dim(modality)` of them): zero padding up to the widest modality (`max_modality_dim`
    channels in all), the Fourier features of the positions (on `linspace(-1, 1)` per axis) and the one-hot
    modality encoding."""
    batch_sizes = set()
    num_modalities = len(multi_modality_data)
    for modality_index, modality_name in enumerate(sorted(multi_modality_data.keys())):
        assert modality_name in modalities, f"modality {modality_name} was not defined in constructor"
        data = multi_modality_data[modality_name]
        modality = modalities[modality_name]
        b, *axis, _ = data.shape
        assert len(axis) == modality.input_axis, (
            f"input data must have the right number of axes for modality {modality_name}. "
            f"Expected {modality.input_axis} while forward argument offered {len(axis)}"
        )
        batch_sizes.add(b)
        assert len(batch_sizes) == 1, "batch size must be the same across all modalities"

        encode = partial(
            fourier_encode, max_freq=modality.max_freq, num_bands=modality.num_freq_bands, base=modality.freq_base
        )
        enc_pos = position_features(axis, encode, data.device)  # float32, as the fork's
        modality_encodings = modality_encoding(b, axis, modality_index, num_modalities, device=data.device)
        # Zero channels pad this modality to the widest one (the one-hot has one channel per modality given).
        padding_size = max_modality_dim - modality_dim(modality) - num_modalities
        padding = torch.zeros(size=data.size()[0:-1] + (padding_size,), device=data.device)
        features = torch.cat((padding, enc_pos.expand(b, *enc_pos.shape), modality_encodings), dim=-1)
        yield modality, data, features


class MultiModalityPerceiver(EncoderMirror):
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
        self.encoder = build_multi_modality_encoder(locals(), input_dim=self.max_modality_dim, use_gelu=use_gelu)
        self.to_logits = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))

    def forward(self, multi_modality_data: dict[str, Tensor], mask: Tensor | None = None) -> Tensor:
        linearized_data = []
        for _, data, features in modality_inputs(
            self.modalities, multi_modality_data, lambda modality: modality.input_dim, self.max_modality_dim
        ):
            data = torch.cat((data, features), dim=-1)
            linearized_data.append(data.reshape(data.shape[0], -1, data.shape[-1]))

        x = self.encode(torch.cat(linearized_data, dim=1), mask)  # (B, L, D)
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
        # The classifier with another `use_gelu` default, less its head: the arguments go on as they are.
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__(**arguments, num_classes=1)
        self.to_logits = Identity()

    def pool(self, x: Tensor) -> Tensor:
        """No pooling: the latents `(B, L, D)`."""
        return x
