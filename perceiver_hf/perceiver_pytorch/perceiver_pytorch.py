"""lucidrains' `perceiver_pytorch.perceiver_pytorch` (`Perceiver`, `fourier_encode`), run on this package's encoder.

Mirrors perceiver-pytorch 0.9.0, lucidrains/perceiver-pytorch commit 96097c6a27cc64fc1f196d3a58d32b8a82f573e1.
Same constructor arguments (keyword-only), defaults, forward signature and return values as there; the input
features (data, then Fourier-encoded positions on `linspace(-1, 1)` per axis, flattened) are computed exactly as
there, and the layers are `PerceiverEncoder` configured as lucidrains' stack:
`depth x (cross-attention -> self_per_cross_attn x self-attention)`, GEGLU feed-forwards widening 4x.

`weight_tie_layers=True` ties as lucidrains' `cache_fn(key=block_ind)` does: layer 1 has its own weights; layers
2.. share one cross-attention layer and, per position `j` in the self-attention block, one self-attention layer.

Deliberate differences:

- the parameters are named as the core's (`encoder.cross_attention.0.attention.q_proj.weight`, with `to_kv` split
  into `k_proj` / `v_proj`); `load_original_state_dict` loads a state dict of the original;
- `self_per_cross_attn=0` (cross-attention only) is not supported: the core's blocks have at least one layer;
- a `mask` that masks out every input of an example raises a `ValueError` (the original attends uniformly).

The original's building blocks (`PreNorm`, `Attention`, `FeedForward`, `GEGLU`, `cache_fn`) are not mirrored: the
core's layers replace them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from math import pi

import torch
from torch import nn

from ._translate import (
    EncoderMirror,
    KeyMapEntry,
    MeanOverLatents,
    attention_renames,
    build_config,
    build_encoder,
    feed_forward_renames,
)

__all__ = ["Perceiver", "fourier_encode", "exists", "default", "lucidrains_weight_sharing", "position_features"]


def exists(val) -> bool:
    return val is not None


def default(val, d):
    return val if exists(val) else d


def fourier_encode(x: torch.Tensor, max_freq: float, num_bands: int = 4) -> torch.Tensor:
    """Fourier features of positions `x` `(...)`: `(..., 2 * num_bands + 1)`, the sines of `x * f * pi` for
    `num_bands` frequencies `f` linearly spaced from 1 to `max_freq / 2`, then the cosines, then `x`."""
    x = x.unsqueeze(-1)
    orig_x = x
    scales = torch.linspace(1.0, max_freq / 2, num_bands, device=x.device, dtype=x.dtype)
    x = x * scales * pi
    return torch.cat((x.sin(), x.cos(), orig_x), dim=-1)


def position_features(
    axis: Sequence[int], encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype=None
) -> torch.Tensor:
    """The Fourier features `(*axis, F)` of the positions of an `axis`-shaped input, as lucidrains' and the fork's
    `forward` compute them: positions on `linspace(-1, 1)` per axis, encoded by `encode` (their `fourier_encode`
    with the model's frequencies), the axes' features side by side."""
    axis_pos = [torch.linspace(-1.0, 1.0, steps=size, device=device, dtype=dtype) for size in axis]
    pos = torch.stack(torch.meshgrid(*axis_pos, indexing="ij"), dim=-1)  # (*axis, len(axis))
    return encode(pos).flatten(-2)


def lucidrains_weight_sharing(depth: int, self_per_cross_attn: int, tied: bool) -> tuple[list[int], list[list[int]]]:
    """The core's weight-sharing lists of lucidrains' `Perceiver`: untied, every layer its own weights; tied, layer
    1 its own and layers 2.. one shared set (cross-attention; and one per block position `j`)."""
    per_block = self_per_cross_attn
    if not tied:
        return list(range(depth)), [[b * per_block + j for j in range(per_block)] for b in range(depth)]
    cross = [0] + [1] * (depth - 1)
    first = list(range(per_block))
    rest = [per_block + j for j in range(per_block)]
    return cross, [first] + [rest] * (depth - 1)


class Perceiver(EncoderMirror):
    """lucidrains' `Perceiver`: inputs `(B, *axes, C)` -> class logits `(B, num_classes)` (latent mean, LayerNorm,
    Linear), or the latents `(B, num_latents, latent_dim)` with `return_embeddings=True` or
    `final_classifier_head=False`.

    Arguments as in the original (see its README); `mask` `(B, *axes)` or `(B, N)`, True for inputs to attend to.
    """

    def __init__(
        self,
        *,
        num_freq_bands: int,
        depth: int,
        max_freq: float,
        input_channels: int = 3,
        input_axis: int = 2,
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
        fourier_encode_data: bool = True,
        self_per_cross_attn: int = 1,
        final_classifier_head: bool = True,
        inverted_cross_attn: bool | tuple[bool, ...] = False,
    ) -> None:
        super().__init__()
        self.input_axis = input_axis
        self.max_freq = max_freq
        self.num_freq_bands = num_freq_bands

        if isinstance(inverted_cross_attn, bool):
            inverted_cross_attn = (inverted_cross_attn,) * depth
        assert len(inverted_cross_attn) == depth, f"inverted_cross_attn tuple must have length of depth ({depth})"
        self.inverted_cross_attn = inverted_cross_attn

        self.fourier_encode_data = fourier_encode_data
        fourier_channels = (input_axis * ((num_freq_bands * 2) + 1)) if fourier_encode_data else 0
        self.config = build_config(
            locals(),
            input_dim=fourier_channels + input_channels,
            sharing=lucidrains_weight_sharing(depth, self_per_cross_attn, weight_tie_layers),
            # lucidrains drops the attention probabilities and the feed-forward's output, not the attention output.
            attention_dropout=attn_dropout,
            attention_output_dropout=0.0,
            mlp_output_dropout=ff_dropout,
            cross_attention_inverted=[bool(flag) for flag in self.inverted_cross_attn],
        )
        self.encoder = build_encoder(self.config)

        self.to_logits = (
            nn.Sequential(MeanOverLatents(), nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))
            if final_classifier_head
            else nn.Identity()
        )

    def forward(
        self, data: torch.Tensor, mask: torch.Tensor | None = None, return_embeddings: bool = False
    ) -> torch.Tensor:
        b, *axis, _ = data.shape
        assert len(axis) == self.input_axis, "input data must have the right number of axis"

        if self.fourier_encode_data:
            # Fourier-encoded positions in [-1, 1] on every axis, concatenated to the data's channels.
            encode = partial(fourier_encode, max_freq=self.max_freq, num_bands=self.num_freq_bands)
            enc_pos = position_features(axis, encode, data.device, data.dtype)  # (*axes, F)
            data = torch.cat((data, enc_pos.expand(b, *enc_pos.shape)), dim=-1)

        x = self.encode(data, mask)  # (B, L, D)
        if return_embeddings:
            return x
        return self.to_logits(x)

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        entries: list[KeyMapEntry] = [("latents", "encoder.latent", None), ("to_logits.", "to_logits.", None)]
        cross, ff, latent = attention_renames(context=True), feed_forward_renames(), attention_renames(context=False)
        for i, cross_key in enumerate(self.encoder.cross_attention_keys):
            entries += [
                (f"layers.{i}.0.", f"encoder.cross_attention.{cross_key}.", cross),
                (f"layers.{i}.1.", f"encoder.cross_attention.{cross_key}.", ff),
            ]
            for j, self_key in enumerate(self.encoder.self_attention_keys[i]):
                entries += [
                    (f"layers.{i}.2.{j}.0.", f"encoder.self_attention.{self_key}.", latent),
                    (f"layers.{i}.2.{j}.1.", f"encoder.self_attention.{self_key}.", ff),
                ]
        return entries
