"""What the perceiver-pytorch mirrors share: the config they build, dropout placement, inverted attention and the
mapping of the originals' state-dict keys onto the core's.

lucidrains' `perceiver_pytorch` and the multi-modality fork build the same layers (`PreNorm(Attention)` then
`PreNorm(FeedForward)`, each with a residual; GEGLU feed-forward widening 4x; no bias on the query, key and value
projections) and differ in where they put dropout, which layers share weights and how they compute input features.
The mirrors compute the input features themselves and run this package's `PerceiverEncoder` /
`PerceiverCrossAttentionLayer`, configured here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from ..configuration_perceiver import PerceiverConfig
from ..modeling_perceiver import PerceiverEncoder

__all__ = [
    "FF_MULT",
    "MeanOverLatents",
    "build_config",
    "cross_layers",
    "self_layers",
    "place_dropout",
    "use_inverted_cross_attention",
    "attention_renames",
    "feed_forward_renames",
    "KeyMapEntry",
    "convert_original_state_dict",
    "load_original_state_dict",
]

# lucidrains' FeedForward widens the latent width 4x (`mult=4`), in both repositories.
FF_MULT = 4


class MeanOverLatents(nn.Module):
    """Mean over the latents, `(B, L, D) -> (B, D)`: einops' `Reduce('b n d -> b d', 'mean')` of lucidrains'
    classifier head, without the einops dependency (it has no parameters, so the head's keys stay the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-2)


def build_config(
    *,
    num_input_channels: int,
    num_latents: int,
    latent_dim: int,
    cross_heads: int,
    cross_dim_head: int,
    latent_heads: int,
    latent_dim_head: int,
    cross_sharing: list[int],
    self_sharing: list[list[int]],
    hidden_act: str = "geglu",
    attention_dropout: float = 0.0,
    block_residual: bool = False,
    **decoder_settings,
) -> PerceiverConfig:
    """The `PerceiverConfig` of a perceiver-pytorch encoder.

    `cross_sharing[i]` is the weight set of cross-attention layer `i`, `self_sharing[b][j]` that of self-attention
    layer `j` of block `b` (numbered in order of first use, as the config wants). The residual dropout is set per
    layer afterwards (`place_dropout`): the core's single `dropout` is on both residual branches, the originals'
    is not.
    """
    return PerceiverConfig(
        input_adapter="none",
        input_adapter_config={"num_input_channels": num_input_channels},
        num_latents=num_latents,
        d_latents=latent_dim,
        num_cross_attention_layers=len(cross_sharing),
        num_self_attention_blocks=len(self_sharing),
        num_self_attention_layers_per_block=len(self_sharing[0]),
        cross_attention_weight_sharing=cross_sharing,
        self_attention_weight_sharing=self_sharing,
        num_cross_attention_heads=cross_heads,
        cross_attention_qk_channels=cross_heads * cross_dim_head,
        cross_attention_v_channels=cross_heads * cross_dim_head,
        num_self_attention_heads=latent_heads,
        self_attention_qk_channels=latent_heads * latent_dim_head,
        self_attention_v_channels=latent_heads * latent_dim_head,
        cross_attention_widening_factor=FF_MULT,
        self_attention_widening_factor=FF_MULT,
        hidden_act=hidden_act,
        qkv_bias=False,  # to_q / to_kv have no bias, to_out has one
        use_query_residual=True,
        self_attention_block_residual=block_residual,
        dropout=0.0,
        attention_dropout=attention_dropout,
        layer_norm_eps=1e-5,  # nn.LayerNorm's default
        **decoder_settings,
    )


def cross_layers(encoder: PerceiverEncoder) -> list[nn.Module]:
    """The encoder's cross-attention layer modules, one per weight set."""
    return list(encoder.cross_attention.values())


def self_layers(encoder: PerceiverEncoder) -> list[nn.Module]:
    """The encoder's self-attention layer modules, one per weight set."""
    return list(encoder.self_attention.values())


def _dropout_input(module: nn.Module, args: tuple[torch.Tensor, ...], p: float) -> tuple[torch.Tensor, ...]:
    return (F.dropout(args[0], p=p, training=module.training),)


def place_dropout(
    layers: Iterable[nn.Module], *, attention_output: float, mlp_output: float, mlp_hidden: float = 0.0
) -> None:
    """Put the originals' dropout where they have it, in core cross- or self-attention layers.

    `attention_output`: on the attention's output (the fork's `to_out` dropout; lucidrains has none there);
    `mlp_output`: after the feed-forward's last linear layer (lucidrains' `FeedForward`); `mlp_hidden`: between
    its two linear layers (the fork's `FeedForward`), applied by a pre-hook on the second one, which leaves the
    parameters and their names as they are.
    """
    for layer in layers:
        layer.dropout.p = attention_output
        layer.mlp.dropout.p = mlp_output
        if mlp_hidden > 0.0:
            layer.mlp.fc2.register_forward_pre_hook(partial(_dropout_input, p=mlp_hidden))


# ---------------------------------------------------------------------------------------------------------------
# Inverted cross-attention (lucidrains 0.9: `inverted_cross_attn`)
# ---------------------------------------------------------------------------------------------------------------

INVERTED_ATTENTION = "perceiver_pytorch_inverted"


def inverted_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lucidrains' inverted attention (slot attention): softmax over the queries, so that the latents compete for
    each input, then each latent's weights renormalised to sum to 1 (`l1norm`). In the core's attention-interface
    form: `query` `(B, H, Nq, Dk)`, `attention_mask` boolean `(B, 1, 1, Nkv)`, True where a key may be attended;
    returns `(B, Nq, H, Dv)` and the weights."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Nq, Nkv)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, -torch.finfo(scores.dtype).max)
    weights = scores.softmax(dim=-2)
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, 0.0)
    weights = F.normalize(weights, p=1, dim=-1, eps=1e-8)
    out = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)  # (B, H, Nq, Dv)
    return out.transpose(1, 2), weights


# Registered with transformers' attention interface, which the core's `PerceiverAttention` dispatches through.
AttentionInterface.register(INVERTED_ATTENTION, inverted_attention_forward)


def use_inverted_cross_attention(encoder: PerceiverEncoder, inverted: tuple[bool, ...]) -> None:
    """Make cross-attention layer `i` use inverted attention where `inverted[i]`.

    The core has no per-layer attention choice, so the attention modules of those layers get a copy of the config
    naming the inverted attention function. A weight set serves all the layers that share it: layers that share
    weights must agree on `inverted`.
    """
    by_module: dict[str, set[bool]] = {}
    for key, flag in zip(encoder.cross_attention_keys, inverted, strict=True):
        by_module.setdefault(key, set()).add(flag)
    for key, flags in by_module.items():
        if len(flags) > 1:
            raise NotImplementedError(
                "inverted_cross_attn must be the same for cross-attention layers that share weights "
                "(weight_tie_layers=True ties layers 1..): the core chooses the attention per weight set"
            )
        if flags == {True}:
            attention = encoder.cross_attention[key].attention
            attention.config = copy.copy(attention.config)
            attention.config._attn_implementation = INVERTED_ATTENTION


# ---------------------------------------------------------------------------------------------------------------
# The originals' state-dict keys -> the mirrors'
# ---------------------------------------------------------------------------------------------------------------

# An original parameter name (relative to one original module) -> the mirror's name (relative to the core layer
# holding it), or two names for `to_kv.weight`, which the core splits into separate key and value projections.
Renames = Mapping[str, "str | tuple[str, str]"]
# (original prefix, mirror prefix, renames or None to keep the rest of the name); a whole key ("latents") is a prefix
# with nothing after it.
KeyMapEntry = tuple[str, str, Renames | None]

_AFFINE = ("weight", "bias")


def attention_renames(*, context: bool, out: str = "to_out") -> dict[str, str | tuple[str, str]]:
    """`PreNorm(Attention)` -> a core cross-attention layer (`context=True`: it has `norm_context`) or
    self-attention layer. `out` is the output projection's name (`to_out`; the fork's is `to_out.0`)."""
    renames: dict[str, str | tuple[str, str]] = {f"norm.{p}": f"{'q_norm' if context else 'norm'}.{p}" for p in _AFFINE}
    if context:
        renames.update({f"norm_context.{p}": f"kv_norm.{p}" for p in _AFFINE})
    renames["fn.to_q.weight"] = "attention.q_proj.weight"
    renames["fn.to_kv.weight"] = ("attention.k_proj.weight", "attention.v_proj.weight")
    renames.update({f"fn.{out}.{p}": f"attention.o_proj.{p}" for p in _AFFINE})
    return renames


def feed_forward_renames(*, fc2_index: int = 2) -> dict[str, str]:
    """`PreNorm(FeedForward)` -> the core layer's MLP. The second linear layer is `net.2` in lucidrains'
    `FeedForward`, `net.3` in the fork's (its dropout comes before it)."""
    renames = {f"norm.{p}": f"mlp.norm.{p}" for p in _AFFINE}
    renames.update({f"fn.net.0.{p}": f"mlp.fc1.{p}" for p in _AFFINE})
    renames.update({f"fn.net.{fc2_index}.{p}": f"mlp.fc2.{p}" for p in _AFFINE})
    return renames


def convert_original_state_dict(
    entries: Iterable[KeyMapEntry], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The mirror's state dict holding the original's `state_dict`.

    Layers that share weights appear under each of their positions in the original's state dict and once in the
    mirror's; every alias maps to that one key. Raises a `KeyError` naming the keys no entry maps.
    """
    entries = list(entries)
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        for original_prefix, mirror_prefix, renames in entries:
            if not key.startswith(original_prefix):
                continue
            suffix = key[len(original_prefix) :]
            if renames is None:
                converted[mirror_prefix + suffix] = value
                break
            if suffix in renames:
                target = renames[suffix]
                if isinstance(target, tuple):  # to_kv: keys then values, stacked along the output channels
                    for name, part in zip(target, value.chunk(2, dim=0), strict=True):
                        converted[mirror_prefix + name] = part
                else:
                    converted[mirror_prefix + target] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"no mirror parameter for these keys of the original state dict: {unmapped}")
    return converted


def load_original_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a state dict saved by the original package (`torch.save(original_model.state_dict(), ...)`) into the
    mirror model built with the same arguments. Returns `load_state_dict`'s result."""
    converted = convert_original_state_dict(model.original_key_map(), state_dict)
    return model.load_state_dict(converted, strict=strict)
