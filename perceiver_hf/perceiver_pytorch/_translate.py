"""What the perceiver-pytorch mirrors share: the config and encoder they build, the models' common surface and the
mapping of the originals' state-dict keys onto the core's.

lucidrains' `perceiver_pytorch` and the multi-modality fork build the same layers (`PreNorm(Attention)` then
`PreNorm(FeedForward)`, each with a residual; GEGLU feed-forward widening 4x; no bias on the query, key and value
projections) and differ in where they put dropout, which layers share weights and how they compute input features.
The mirrors compute the input features themselves and run this package's `PerceiverEncoder` /
`PerceiverCrossAttentionLayer`, configured here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..configuration_perceiver import PerceiverConfig
from ..modeling_perceiver import PerceiverEncoder

__all__ = [
    "FF_MULT",
    "MeanOverLatents",
    "EncoderMirror",
    "layer_settings",
    "build_config",
    "build_encoder",
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


class EncoderMirror(nn.Module):
    """What every mirrored model has: a core `PerceiverEncoder` as `encoder`, whose latent array is the original's
    `latents`, run on inputs and masks shaped as the originals take them."""

    encoder: PerceiverEncoder

    @property
    def latents(self) -> nn.Parameter:
        """The latent array `(num_latents, latent_dim)` (the original's `latents`)."""
        return self.encoder.latent

    def encode(self, inputs: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """The latents `(B, L, D)` of `inputs` `(B, *positions, C)` (or one `(B, N, C)` array per cross-attention
        layer); the originals take `mask` `(B, *positions)`, True for inputs to attend to, the core `(B, N)`."""
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
        return self.encoder(inputs, attention_mask=mask).last_hidden_state


def layer_settings(layer: str, heads: int, dim_head: int) -> dict[str, int]:
    """The core's settings of one kind of attention layer (`layer`: "cross_attention", "self_attention" or
    "decoder"): the originals' `heads` heads of width `dim_head` for queries, keys and values, and the 4x
    feed-forward."""
    width = heads * dim_head
    return {
        f"num_{layer}_heads": heads,
        f"{layer}_qk_channels": width,
        f"{layer}_v_channels": width,
        f"{layer}_widening_factor": FF_MULT,
    }


def build_config(
    arguments: Mapping[str, Any],
    *,
    input_dim: int,
    sharing: tuple[list[int], list[list[int]]],
    hidden_act: str = "geglu",
    block_residual: bool = False,
    **settings,
) -> PerceiverConfig:
    """The `PerceiverConfig` of a perceiver-pytorch encoder.

    `arguments` are the mirror constructor's arguments (`locals()`): the layer sizes that all of lucidrains' and the
    fork's constructors take, under the same names and with the same meaning (`num_latents`, `latent_dim`,
    `cross_heads`, `cross_dim_head`, `latent_heads`, `latent_dim_head`), are read from there rather than passed on
    one by one by each model. `sharing` is `(cross_sharing, self_sharing)`: `cross_sharing[i]` is the weight set of
    cross-attention layer `i`, `self_sharing[b][j]` that of self-attention layer `j` of block `b` (numbered in order
    of first use, as the config wants). `settings`: the rest of the config, e.g. where the model drops
    (`attention_dropout`, `attention_output_dropout`, `mlp_output_dropout`, `mlp_hidden_dropout`: the originals
    differ), `cross_attention_inverted` or the decoder's settings.
    """
    cross_sharing, self_sharing = sharing
    return PerceiverConfig(
        input_adapter="none",
        input_adapter_config={"num_input_channels": input_dim},
        num_latents=arguments["num_latents"],
        d_latents=arguments["latent_dim"],
        num_cross_attention_layers=len(cross_sharing),
        num_self_attention_blocks=len(self_sharing),
        num_self_attention_layers_per_block=len(self_sharing[0]),
        cross_attention_weight_sharing=cross_sharing,
        self_attention_weight_sharing=self_sharing,
        **layer_settings("cross_attention", arguments["cross_heads"], arguments["cross_dim_head"]),
        **layer_settings("self_attention", arguments["latent_heads"], arguments["latent_dim_head"]),
        hidden_act=hidden_act,
        qkv_bias=False,  # to_q / to_kv have no bias, to_out has one
        use_query_residual=True,
        self_attention_block_residual=block_residual,
        dropout=0.0,  # each model says where it drops (`settings`)
        layer_norm_eps=1e-5,  # nn.LayerNorm's default
        **settings,
    )


def build_encoder(config: PerceiverConfig) -> PerceiverEncoder:
    """The core encoder of `config`, its latents drawn as the originals' (`torch.randn`)."""
    encoder = PerceiverEncoder(config)
    nn.init.normal_(encoder.latent)
    return encoder


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
