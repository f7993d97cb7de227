"""What the fork's mirrored models share: their encoder (weight sharing, activation, dropout placement) and the
names of their parameters in the original.

Mirrors perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit
9d5e35657d7a2ffbfd6f0506b54255facf23fa9e.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..modeling_perceiver import PerceiverEncoder
from ..perceiver_pytorch._translate import (
    KeyMapEntry,
    attention_renames,
    build_config,
    build_encoder,
    feed_forward_renames,
)

__all__ = ["fork_weight_sharing", "build_fork_encoder", "build_multi_modality_encoder", "fork_layers_key_map"]


def fork_weight_sharing(depth: int, blocks_per_layer: int, tied: bool) -> tuple[list[int], list[list[int]]]:
    """The core's weight-sharing lists of the fork's `build_perceiver_layers` / `LatentTransformer`.

    Untied, every layer has its own weights. Tied (`cache_by_name_fn`): cross-attention layer 1 its own, layers
    2.. one shared set; in each layer's latent transformer, block 1 its own weights and block `j >= 2` the set of
    position `j` shared by ALL layers (the first layer's included).
    """
    k = blocks_per_layer
    if not tied:
        return list(range(depth)), [[b * k + j for j in range(k)] for b in range(depth)]
    cross = [0] + [1] * (depth - 1)
    # Sets 0..k-1: layer 1's blocks; set k + b - 1: block 1 of layer b + 1 (numbered in order of first use).
    return cross, [list(range(k))] + [[k + b - 1] + list(range(1, k)) for b in range(1, depth)]


def build_fork_encoder(
    arguments: Mapping[str, Any],
    *,
    input_dim: int,
    sharing: tuple[list[int], list[list[int]]],
    use_gelu: bool,
    block_residual: bool,
) -> PerceiverEncoder:
    """The core encoder of a fork model: one cross-attention layer then one block of self-attention layers per entry
    of the weight-sharing lists `sharing`, with the fork's extra residual around each block when `block_residual`.

    `arguments` are the model constructor's arguments (`locals()`), which hold the layer sizes (see `build_config`)
    and the fork's `attn_dropout` and `ff_dropout`.
    """
    config = build_config(
        arguments,
        input_dim=input_dim,
        sharing=sharing,
        hidden_act="gelu" if use_gelu else "geglu",
        block_residual=block_residual,
        # The fork drops the attention output (`to_out`'s Dropout) and the feed-forward's hidden activations.
        attention_output_dropout=arguments["attn_dropout"],
        mlp_output_dropout=0.0,
        mlp_hidden_dropout=arguments["ff_dropout"],
    )
    return build_encoder(config)


def build_multi_modality_encoder(arguments: Mapping[str, Any], *, input_dim: int, use_gelu: bool) -> PerceiverEncoder:
    """The core encoder of the fork's multi-modality models (`build_perceiver_layers`): the fork's weight sharing
    (`fork_weight_sharing` of the constructor's `depth`, `num_latent_blocks_per_layer` and `weight_tie_layers`)
    and its extra residual around each latent transformer. `arguments`: as in `build_fork_encoder`."""
    sharing = fork_weight_sharing(
        arguments["depth"], arguments["num_latent_blocks_per_layer"], arguments["weight_tie_layers"]
    )
    return build_fork_encoder(arguments, input_dim=input_dim, sharing=sharing, use_gelu=use_gelu, block_residual=True)


def fork_layers_key_map(encoder: PerceiverEncoder) -> list[KeyMapEntry]:
    """Where the parameters of the fork's `build_perceiver_layers` (`layers.i.0` cross-attention, `layers.i.1` its
    feed-forward, `layers.i.2.latent_blocks.j.{0,1}` the latent transformer) and `latents` are in the mirror."""
    cross, latent = attention_renames(context=True, out="to_out.0"), attention_renames(context=False, out="to_out.0")
    ff = feed_forward_renames(fc2_index=3)
    entries: list[KeyMapEntry] = [("latents", "encoder.latent", None)]
    for i, cross_key in enumerate(encoder.cross_attention_keys):
        entries += [
            (f"layers.{i}.0.", f"encoder.cross_attention.{cross_key}.", cross),
            (f"layers.{i}.1.", f"encoder.cross_attention.{cross_key}.", ff),
        ]
        for j, self_key in enumerate(encoder.self_attention_keys[i]):
            entries += [
                (f"layers.{i}.2.latent_blocks.{j}.0.", f"encoder.self_attention.{self_key}.", latent),
                (f"layers.{i}.2.latent_blocks.{j}.1.", f"encoder.self_attention.{self_key}.", ff),
            ]
    return entries
