"""The multi-modality fork's `perceiver_pytorch.perceiver_pytorch` (`Perceiver`, `fourier_encode`), run on this
package's encoder.

Mirrors perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit
9d5e35657d7a2ffbfd6f0506b54255facf23fa9e. The fork's `Perceiver` predates lucidrains' current one and differs from
it (`perceiver_hf.perceiver_pytorch.Perceiver`): Fourier frequencies are logarithmically spaced from `freq_base` to
`max_freq / 2`; each of the `depth` layers is one cross-attention and one self-attention layer, and
`weight_tie_layers=True` shares all of layers 2..; dropout is on the attention output (`attn_dropout`) and between
the feed-forward's linear layers (`ff_dropout`); the head is latent mean, LayerNorm, Linear.

Deliberate differences:

- the parameters are named as the core's (`to_kv` split into `k_proj` / `v_proj`); `load_original_state_dict`
  loads a state dict of the original;
- a `mask` that masks out every input of an example raises a `ValueError` (the original attends uniformly).

The fork's later releases (1.3.1: attention in float32; 1.3.2: activation checkpointing) are not mirrored; the
core's `gradient_checkpointing` attribute offers the latter.
"""

from __future__ import annotations

from functools import partial
from math import log, pi

import torch
from torch import nn

from ..perceiver_pytorch._translate import EncoderMirror, KeyMapEntry, attention_renames, feed_forward_renames
from ..perceiver_pytorch.perceiver_pytorch import default, exists, lucidrains_weight_sharing, position_features
from ._fork import build_fork_encoder

__all__ = ["Perceiver", "fourier_encode", "exists", "default"]


def fourier_encode(x: torch.Tensor, max_freq: float, num_bands: int = 4, base: float = 2) -> torch.Tensor:
    """Fourier features of positions `x` `(...)`: `(..., 2 * num_bands + 1)`, the sines of `x * f * pi` for
    `num_bands` frequencies `f` logarithmically spaced from `base` to `max_freq / 2`, then the cosines, then `x`."""
    x = x.unsqueeze(-1)
    orig_x = x
    scales = torch.logspace(1.0, log(max_freq / 2) / log(base), num_bands, base=base, device=x.device, dtype=x.dtype)
    x = x * scales * pi
    return torch.cat((x.sin(), x.cos(), orig_x), dim=-1)


class Perceiver(EncoderMirror):
    """The fork's `Perceiver`: inputs `(B, *axes, C)` -> class logits `(B, num_classes)`. `mask` `(B, *axes)` or
    `(B, N)`: True for inputs to attend to."""

    def __init__(
        self,
        *,
        num_freq_bands: int,
        depth: int,
        max_freq: float,
        freq_base: float = 2,
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
    ) -> None:
        super().__init__()
        self.input_axis = input_axis
        self.max_freq = max_freq
        self.num_freq_bands = num_freq_bands
        self.freq_base = freq_base

        # One cache per layer type (`cache_fn`): tied, layer 1 its own weights and layers 2.. one set.
        self.encoder = build_fork_encoder(
            locals(),
            input_dim=input_axis * ((num_freq_bands * 2) + 1) + input_channels,
            sharing=lucidrains_weight_sharing(depth, 1, weight_tie_layers),
            use_gelu=False,
            block_residual=False,
        )
        self.to_logits = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))

    def forward(self, data: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, *axis, _ = data.shape
        assert len(axis) == self.input_axis, "input data must have the right number of axis"

        # Fourier-encoded positions in [-1, 1] on every axis (float32, as the fork's), after the data's channels.
        encode = partial(fourier_encode, max_freq=self.max_freq, num_bands=self.num_freq_bands, base=self.freq_base)
        enc_pos = position_features(axis, encode, data.device)  # (*axes, F)
        data = torch.cat((data, enc_pos.expand(b, *enc_pos.shape)), dim=-1)
        x = self.encode(data, mask)  # (B, L, D)
        return self.to_logits(x.mean(dim=-2))

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        cross, latent = (
            attention_renames(context=True, out="to_out.0"),
            attention_renames(context=False, out="to_out.0"),
        )
        ff = feed_forward_renames(fc2_index=3)
        entries: list[KeyMapEntry] = [("latents", "encoder.latent", None), ("to_logits.", "to_logits.", None)]
        for i, cross_key in enumerate(self.encoder.cross_attention_keys):
            (self_key,) = self.encoder.self_attention_keys[i]
            entries += [
                (f"layers.{i}.0.", f"encoder.cross_attention.{cross_key}.", cross),
                (f"layers.{i}.1.", f"encoder.cross_attention.{cross_key}.", ff),
                (f"layers.{i}.2.", f"encoder.self_attention.{self_key}.", latent),
                (f"layers.{i}.3.", f"encoder.self_attention.{self_key}.", ff),
            ]
        return entries
