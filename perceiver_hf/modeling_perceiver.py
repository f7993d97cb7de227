"""Perceiver IO: attention, encoder, decoder, and the Hugging Face models built from them.

Notation used in the shape comments:
    B  batch                    N  input positions            C  input channels
    L  latents (num_latents)    D  latent channels (d_latents)
    Q  output queries           E  output query channels
    H  attention heads          Dk / Dv  query-key / value channels per head

The plain-PyTorch building blocks (`PerceiverAttention`, `PerceiverCrossAttentionLayer`,
`PerceiverSelfAttentionLayer`, `PerceiverEncoder`, `PerceiverDecoder`, `PerceiverIO`) take explicit
arguments, so models can be composed from adapters by hand. The `PreTrainedModel` classes below
build the same blocks from a `PerceiverConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithCrossAttentions,
    ImageClassifierOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput, logging

from .adapters import (
    DEFAULT_LEARNED_POSITION_CHANNELS,
    ClassificationOutputAdapter,
    ImageInputAdapter,
    InputAdapter,
    OutputAdapter,
    TextInputAdapter,
    TextOutputAdapter,
    _require_positive_int,
)
from .adapters_audio import AudioInputAdapter
from .adapters_multimodal import MultimodalInputAdapter
from .configuration_perceiver import ATTN_IMPLEMENTATIONS, PerceiverConfig
from .position_encoding import LearnedPositionEncoding

__all__ = [
    "PerceiverAttention",
    "PerceiverMLP",
    "PerceiverCrossAttentionLayer",
    "PerceiverSelfAttentionLayer",
    "PerceiverSelfAttentionBlock",
    "PerceiverEncoder",
    "PerceiverDecoder",
    "PerceiverDecoderOutput",
    "PerceiverIO",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "input_adapter_from_config",
]

logger = logging.get_logger(__name__)


def _check_attn_implementation(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation ({attn_implementation!r}) must be one of {list(ATTN_IMPLEMENTATIONS)}")
    return attn_implementation


def _check_features(name: str, x: torch.Tensor | None, channels: int, batch_size: int | None = None) -> None:
    """Raise a `ValueError` unless `x` is `(batch, positions, channels)` (with `batch_size` rows when given):
    a wrong rank or width would otherwise fail deep inside a LayerNorm or a matmul."""
    if x is None or x.ndim != 3 or x.shape[-1] != channels:
        got = None if x is None else tuple(x.shape)
        raise ValueError(f"{name} must have shape (batch, positions, {channels}), got {got}")
    if batch_size is not None and x.shape[0] != batch_size:
        raise ValueError(f"{name} must hold {batch_size} examples, as the other input does, got {x.shape[0]}")


def _check_attention_mask(attention_mask: torch.Tensor | None, batch_size: int, num_positions: int) -> None:
    if attention_mask is None:
        return
    if attention_mask.shape != (batch_size, num_positions):
        raise ValueError(
            f"attention_mask must have shape (batch, positions) = ({batch_size}, {num_positions}), "
            f"got {tuple(attention_mask.shape)}"
        )
    # A row without any position to attend to has no defined softmax (eager and SDPA disagree on it).
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the compiled graph; eager runs have checked it
    empty_rows = (attention_mask == 0).all(dim=1)
    if empty_rows.any():
        raise ValueError(
            f"attention_mask rows {empty_rows.nonzero().flatten().tolist()} mask out every input position; "
            "each example needs at least one position to attend to"
        )


class PerceiverAttention(nn.Module):
    """Multi-head attention with separate query-key and value widths. Never causal.

    Args:
        num_heads: number of heads `H`.
        num_q_input_channels: width of the query inputs.
        num_kv_input_channels: width of the key/value inputs.
        num_qk_channels: query-key width, split over heads (`num_q_input_channels` when `None`).
        num_v_channels: value width, split over heads (`num_qk_channels` when `None`).
        num_output_channels: width of the output projection (`num_q_input_channels` when `None`).
        attention_dropout: dropout on the attention probabilities (training only).
        attn_implementation: `"sdpa"` (torch `scaled_dot_product_attention`) or `"eager"` (explicit
            softmax; can return the attention weights).
    """

    # transformers' attention integrations treat a module without this flag as causal.
    is_causal = False

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_output_channels: int | None = None,
        attention_dropout: float = 0.0,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        num_qk_channels = num_qk_channels or num_q_input_channels
        num_v_channels = num_v_channels or num_qk_channels
        num_output_channels = num_output_channels or num_q_input_channels
        for name, value in (
            ("num_heads", num_heads), ("num_q_input_channels", num_q_input_channels),
            ("num_kv_input_channels", num_kv_input_channels), ("num_qk_channels", num_qk_channels),
            ("num_v_channels", num_v_channels), ("num_output_channels", num_output_channels),
        ):  # fmt: skip
            _require_positive_int(name, value)
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout ({attention_dropout!r}) must be a float in [0, 1)")
        for name, channels in (("num_qk_channels", num_qk_channels), ("num_v_channels", num_v_channels)):
            if channels % num_heads != 0:
                raise ValueError(f"{name} ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qk_head_channels = num_qk_channels // num_heads
        self.v_head_channels = num_v_channels // num_heads
        self.attention_dropout = attention_dropout
        self.attn_implementation = _check_attn_implementation(attn_implementation)
        self.q_proj = nn.Linear(num_q_input_channels, num_qk_channels)
        self.k_proj = nn.Linear(num_kv_input_channels, num_qk_channels)
        self.v_proj = nn.Linear(num_kv_input_channels, num_v_channels)
        self.o_proj = nn.Linear(num_v_channels, num_output_channels)

    def _split_heads(self, x: torch.Tensor, head_channels: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, head_channels).transpose(1, 2)  # (B, H, n, d)

    def project_kv(self, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `(B, H, Nkv, Dk)` and values `(B, H, Nkv, Dv)` of `x_kv` `(B, Nkv, Ckv)`."""
        k = self._split_heads(self.k_proj(x_kv), self.qk_head_channels)
        v = self._split_heads(self.v_proj(x_kv), self.v_head_channels)
        return k, v

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x_q: queries `(B, Nq, Cq)`.
            x_kv: keys/values `(B, Nkv, Ckv)`; may be `None` when `kv` is given.
            attention_mask: `(B, Nkv)`, 1 (or True) for positions to attend to, 0 for padding.
            output_attentions: also return the attention weights `(B, H, Nq, Nkv)` (computed eagerly).
            kv: keys and values from `project_kv(x_kv)`, to reuse them across calls.

        Returns:
            `(output (B, Nq, num_output_channels), attention weights or None)`.
        """
        _check_features("x_q", x_q, self.q_proj.in_features)
        if kv is None:
            _check_features("x_kv", x_kv, self.k_proj.in_features, batch_size=x_q.shape[0])
            if x_kv.shape[1] == 0:  # SDPA would silently return zeros: attention over nothing is undefined
                raise ValueError(f"x_kv must hold at least one position to attend to, got shape {tuple(x_kv.shape)}")
        q = self._split_heads(self.q_proj(x_q), self.qk_head_channels)  # (B, H, Nq, Dk)
        k, v = kv if kv is not None else self.project_kv(x_kv)  # (B, H, Nkv, Dk), (B, H, Nkv, Dv)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Nkv)
        dropout_p = self.attention_dropout if self.training else 0.0

        weights = None
        if self.attn_implementation == "sdpa" and not output_attentions:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=False)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.qk_head_channels)  # (B, H, Nq, Nkv)
            if keep is not None:
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            # Softmax in fp32 keeps half-precision runs stable.
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(F.dropout(weights, p=dropout_p, training=self.training), v)  # (B, H, Nq, Dv)
        b, _, nq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, nq, self.num_heads * self.v_head_channels)  # (B, Nq, H*Dv)
        # The eager path computes weights anyway; return them only when asked, as documented.
        return self.o_proj(out), weights if output_attentions else None


class PerceiverMLP(nn.Module):
    """Pre-LayerNorm MLP: `LayerNorm -> Linear(C, w*C) -> GELU (or GEGLU) -> Linear(w*C, C) -> dropout`."""

    def __init__(
        self,
        num_channels: int,
        widening_factor: int = 1,
        dropout: float = 0.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if hidden_act not in ("gelu", "geglu"):
            raise ValueError(f"hidden_act ({hidden_act!r}) must be 'gelu' or 'geglu'")
        hidden = widening_factor * num_channels
        self.hidden_act = hidden_act
        self.norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        # GEGLU gates half of a doubled hidden layer with the GELU of the other half.
        self.fc1 = nn.Linear(num_channels, 2 * hidden if hidden_act == "geglu" else hidden)
        self.fc2 = nn.Linear(hidden, num_channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        if self.hidden_act == "geglu":
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.dropout(self.fc2(h))


class PerceiverCrossAttentionLayer(nn.Module):
    """Cross-attention from queries to key/value inputs, then an MLP, each with a residual.

    `x = attention(LN(x_q), LN(x_kv)) [+ x_q]; x = x + MLP(x)`, as in DeepMind's Perceiver IO. The query
    residual is optional: DeepMind's masked-LM decoder has none.
    """

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(num_q_input_channels, eps=layer_norm_eps)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels, eps=layer_norm_eps)
        self.attention = PerceiverAttention(
            num_heads,
            num_q_input_channels,
            num_kv_input_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            attention_dropout=attention_dropout,
            attn_implementation=attn_implementation,
        )
        self.dropout = nn.Dropout(dropout)
        self.use_query_residual = use_query_residual
        self.mlp = PerceiverMLP(num_q_input_channels, widening_factor, dropout, hidden_act, layer_norm_eps)

    def project_kv(self, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, projected keys and values of `x_kv`, reusable across calls of this layer."""
        norm, attn = self.kv_norm, self.attention
        if x_kv.requires_grad or norm.weight is None:
            return attn.project_kv(norm(x_kv))
        # Inputs without gradient (pixels and Fourier features): the LayerNorm's affine is folded into the
        # projections, `W (g * x_hat + b) + c = (W * g) x_hat + (W b + c)`, so the backward pass skips the
        # (N, Ckv) input gradient that only the LayerNorm's weight and bias would use (-19% of a 224x224
        # image training step). Same function, same parameters.
        x_hat = F.layer_norm(x_kv, norm.normalized_shape, eps=norm.eps)  # (B, N, Ckv)
        k = F.linear(x_hat, attn.k_proj.weight * norm.weight, attn.k_proj(norm.bias))  # (B, N, H*Dk)
        v = F.linear(x_hat, attn.v_proj.weight * norm.weight, attn.v_proj(norm.bias))  # (B, N, H*Dv)
        return attn._split_heads(k, attn.qk_head_channels), attn._split_heads(v, attn.v_head_channels)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_features("x_q", x_q, self.q_norm.normalized_shape[0])
        if kv is None:
            _check_features("x_kv", x_kv, self.kv_norm.normalized_shape[0], batch_size=x_q.shape[0])
            kv = self.project_kv(x_kv)
        attended, weights = self.attention(self.q_norm(x_q), None, attention_mask, output_attentions, kv)
        x = self.dropout(attended)
        if self.use_query_residual:
            x = x + x_q
        return x + self.mlp(x), weights  # (B, Nq, Cq)


class PerceiverSelfAttentionLayer(nn.Module):
    """Self-attention then an MLP, each pre-LayerNorm with a residual."""

    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        widening_factor: int = 1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=layer_norm_eps)
        self.attention = PerceiverAttention(
            num_heads,
            num_channels,
            num_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            attention_dropout=attention_dropout,
            attn_implementation=attn_implementation,
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp = PerceiverMLP(num_channels, widening_factor, dropout, hidden_act, layer_norm_eps)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_features("x", x, self.norm.normalized_shape[0])
        normed = self.norm(x)
        attended, weights = self.attention(normed, normed, None, output_attentions)
        x = x + self.dropout(attended)
        return x + self.mlp(x), weights  # (B, L, D)


class PerceiverSelfAttentionBlock(nn.ModuleList):
    """`num_layers` self-attention layers applied in sequence to the latents."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__([PerceiverSelfAttentionLayer(**layer_kwargs) for _ in range(num_layers)])


class _CheckpointingMixin:
    """Runs a layer under activation checkpointing when `gradient_checkpointing` is on (training only).

    transformers' `activation_checkpointing_enable()` (`gradient_checkpointing_enable()` before v5) sets
    `gradient_checkpointing` and `_gradient_checkpointing_func` on every module that has the attribute;
    plain-PyTorch users can set `module.gradient_checkpointing = True` directly.
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = staticmethod(partial(checkpoint, use_reentrant=False))

    def _run_layer(self, layer: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return layer(*args)


class PerceiverEncoder(_CheckpointingMixin, nn.Module):
    """Perceiver encoder: cross-attention from a latent array to the adapted inputs, then self-attention.

    The encoder runs `num_self_attention_blocks` blocks of `num_self_attention_layers_per_block`
    self-attention layers; a cross-attention layer precedes each of the first
    `num_cross_attention_layers` blocks. Weight sharing, by reusing module objects:

    - cross-attention layers 2.. share one set of weights (`cross_attention_n`); layer 1 has its own
      unless `first_cross_attention_layer_shared`;
    - self-attention blocks 2.. share one set of weights (`self_attention_n`); block 1 has its own
      unless `first_self_attention_block_shared`.

    DeepMind's Perceiver IO is `num_cross_attention_layers=1` with all blocks shared; the original
    Perceiver is `num_layers=k` (k cross-attention layers, each followed by a block, layer 1 unshared).

    Args:
        input_adapter: maps raw inputs to `(B, N, C)`; `None` to pass adapted inputs directly (then
            give `num_input_channels`).
        latent_shape: `(num_latents, num_latent_channels)`.
        num_layers: the original Perceiver IO library's parameter: `num_layers` cross-attention layers,
            each followed by a self-attention block, layer 1 with its own weights, layers 2.. shared.
            Overrides the cross-attention and block counts and sharing flags.
        num_cross_attention_layers / num_self_attention_blocks / num_self_attention_layers_per_block:
            see above.
        num_cross_attention_heads / num_self_attention_heads: heads of each attention kind.
        cross_attention_qk_channels / cross_attention_v_channels / self_attention_qk_channels /
        self_attention_v_channels: attention widths (the latent width when `None`).
        cross_attention_widening_factor / self_attention_widening_factor: MLP widening factors.
        use_query_residual: add the latents back after cross-attention.
        dropout / attention_dropout: residual-branch and attention-probability dropout.
        init_scale: standard deviation of the latent array's initialisation.
    """

    def __init__(
        self,
        input_adapter: InputAdapter | None,
        latent_shape: tuple[int, int],
        num_layers: int | None = None,
        num_cross_attention_layers: int = 1,
        num_self_attention_blocks: int = 1,
        num_self_attention_layers_per_block: int = 6,
        num_cross_attention_heads: int = 4,
        num_self_attention_heads: int = 4,
        cross_attention_qk_channels: int | None = None,
        cross_attention_v_channels: int | None = None,
        self_attention_qk_channels: int | None = None,
        self_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        self_attention_widening_factor: int = 1,
        use_query_residual: bool = True,
        first_cross_attention_layer_shared: bool = False,
        first_self_attention_block_shared: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        init_scale: float = 0.02,
        attn_implementation: str = "sdpa",
        num_input_channels: int | None = None,
    ) -> None:
        super().__init__()
        if num_layers is not None:
            num_cross_attention_layers = num_self_attention_blocks = num_layers
            first_cross_attention_layer_shared = first_self_attention_block_shared = False
        if input_adapter is not None:
            num_input_channels = input_adapter.num_input_channels
        elif num_input_channels is None:
            raise ValueError("num_input_channels must be given when input_adapter is None")
        if len(latent_shape) != 2:
            raise ValueError(f"latent_shape ({tuple(latent_shape)}) must be (num_latents, num_latent_channels)")
        for name, value in (
            ("num_latents", latent_shape[0]), ("num_latent_channels", latent_shape[1]),
            ("num_input_channels", num_input_channels), ("num_cross_attention_layers", num_cross_attention_layers),
            ("num_self_attention_blocks", num_self_attention_blocks),
            ("num_self_attention_layers_per_block", num_self_attention_layers_per_block),
        ):  # fmt: skip
            _require_positive_int(name, value)
        if num_cross_attention_layers > num_self_attention_blocks:
            raise ValueError(
                f"num_cross_attention_layers ({num_cross_attention_layers}) must not exceed "
                f"num_self_attention_blocks ({num_self_attention_blocks})"
            )
        num_latents, num_latent_channels = latent_shape
        self.input_adapter = input_adapter
        self.num_input_channels = num_input_channels
        self.latent_shape = (num_latents, num_latent_channels)
        self.num_cross_attention_layers = num_cross_attention_layers
        self.num_self_attention_blocks = num_self_attention_blocks
        self.init_scale = init_scale
        self.latent = nn.Parameter(torch.empty(num_latents, num_latent_channels))

        common = dict(
            dropout=dropout,
            attention_dropout=attention_dropout,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            attn_implementation=attn_implementation,
        )

        def cross_attention_layer() -> PerceiverCrossAttentionLayer:
            return PerceiverCrossAttentionLayer(
                num_cross_attention_heads,
                num_latent_channels,
                num_input_channels,
                num_qk_channels=cross_attention_qk_channels,
                num_v_channels=cross_attention_v_channels,
                widening_factor=cross_attention_widening_factor,
                use_query_residual=use_query_residual,
                **common,
            )

        def self_attention_block() -> PerceiverSelfAttentionBlock:
            return PerceiverSelfAttentionBlock(
                num_self_attention_layers_per_block,
                num_heads=num_self_attention_heads,
                num_channels=num_latent_channels,
                num_qk_channels=self_attention_qk_channels,
                num_v_channels=self_attention_v_channels,
                widening_factor=self_attention_widening_factor,
                **common,
            )

        # Weight sharing: a "_n" module is created only when layers/blocks 2.. need their own weights,
        # and is the same object for all of them. It
        # is `None` when layer/block 1 is reused instead (never registered twice, so every weight has
        # exactly one name in the state dict).
        self.cross_attention_1 = cross_attention_layer()
        self.cross_attention_n = (
            cross_attention_layer()
            if num_cross_attention_layers > 1 and not first_cross_attention_layer_shared
            else None
        )
        self.self_attention_1 = self_attention_block()
        self.self_attention_n = (
            self_attention_block() if num_self_attention_blocks > 1 and not first_self_attention_block_shared else None
        )
        self.reset_latent()

    def reset_latent(self) -> None:
        nn.init.trunc_normal_(self.latent, std=self.init_scale, a=-2 * self.init_scale, b=2 * self.init_scale)

    def _cross_attention(self, i: int) -> PerceiverCrossAttentionLayer:
        return self.cross_attention_1 if i == 0 or self.cross_attention_n is None else self.cross_attention_n

    def _self_attention_block(self, i: int) -> PerceiverSelfAttentionBlock:
        return self.self_attention_1 if i == 0 or self.self_attention_n is None else self.self_attention_n

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **adapter_kwargs: Any,
    ) -> BaseModelOutputWithCrossAttentions:
        """
        Args:
            inputs: raw inputs for the input adapter, or adapted inputs `(B, N, C)` without one.
            attention_mask: `(B, N)`, 1 for input positions to attend to, 0 for padding. An adapter with
                `adapts_attention_mask = True` takes the caller's mask with the inputs and returns the `(B, N)`
                mask with its output (`(x, mask)`), e.g. audio samples -> patches, or a mask per modality.
            adapter_kwargs: options of the input adapter's forward (`interpolate_pos_encoding` of images).

        An adapter may return a list of `num_cross_attention_layers` arrays `(B, N, C)` instead of one: cross-attention
        layer `i` then attends to array `i` (e.g. text embedding channels split across layers).

        Returns:
            `BaseModelOutputWithCrossAttentions` with `last_hidden_state` the latents `(B, L, D)`;
            `hidden_states` the latents after each layer (and the initial array), `attentions` the
            self-attention weights and `cross_attentions` the cross-attention weights when requested.
        """
        if self.input_adapter is None:
            x = inputs
        elif getattr(self.input_adapter, "adapts_attention_mask", False):
            # Adapters of padded or combined inputs (audio, multimodal) map the caller's masks to input positions.
            x, attention_mask = self.input_adapter(inputs, attention_mask, **adapter_kwargs)
        else:
            x = self.input_adapter(inputs, **adapter_kwargs)  # (B, N, C)
        # An adapter may give each cross-attention layer its own array over the same positions (text split across
        # layers); a single array serves every layer.
        layer_inputs = list(x) if isinstance(x, (list, tuple)) else [x] * self.num_cross_attention_layers
        if len(layer_inputs) != self.num_cross_attention_layers:
            raise ValueError(
                f"the input adapter gave {len(layer_inputs)} per-layer inputs for "
                f"{self.num_cross_attention_layers} cross-attention layers"
            )
        x = layer_inputs[0]
        for layer_x in layer_inputs:
            if layer_x.ndim != 3 or layer_x.shape[-1] != self.num_input_channels or layer_x.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"adapted inputs must have shape (batch, positions, {self.num_input_channels}), "
                    f"got {tuple(layer_x.shape)}"
                )
        b, n, _ = x.shape
        if b == 0 or n == 0:
            raise ValueError(f"inputs must hold at least one example and one position, got shape {tuple(x.shape)}")
        _check_attention_mask(attention_mask, b, n)

        x_latent = self.latent.expand(b, -1, -1)  # (B, L, D)
        all_hidden = [x_latent] if output_hidden_states else None
        self_attentions = [] if output_attentions else None
        cross_attentions = [] if output_attentions else None
        # A cross-attention layer whose weights serve several layers sees the same inputs each time:
        # its keys and values are computed (and kept for the backward pass) once, not once per layer.
        shared_kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(self.num_self_attention_blocks):
            if i < self.num_cross_attention_layers:
                cross_attention = self._cross_attention(i)
                layer_x = layer_inputs[i]
                kv = None
                if self.num_cross_attention_layers > 1:
                    key = (id(cross_attention), id(layer_x))  # the same weights and the same inputs
                    kv = shared_kv.get(key)
                    if kv is None:
                        kv = shared_kv[key] = cross_attention.project_kv(layer_x)
                x_latent, weights = self._run_layer(
                    cross_attention, x_latent, layer_x, attention_mask, output_attentions, kv
                )
                if output_attentions:
                    cross_attentions.append(weights)
                if output_hidden_states:
                    all_hidden.append(x_latent)
            for layer in self._self_attention_block(i):
                x_latent, weights = self._run_layer(layer, x_latent, output_attentions)
                if output_attentions:
                    self_attentions.append(weights)
                if output_hidden_states:
                    all_hidden.append(x_latent)
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=x_latent,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )


@dataclass
class PerceiverDecoderOutput(ModelOutput):
    """Output of `PerceiverDecoder`.

    Args:
        logits: the output adapter's output.
        last_hidden_state: decoded queries `(B, Q, E)` before the output adapter.
        cross_attentions: decoder cross-attention weights `(B, H, Q, L)` when requested.
    """

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cross_attentions: torch.Tensor | None = None


class PerceiverDecoder(_CheckpointingMixin, nn.Module):
    """Perceiver IO decoder: output queries cross-attend to the latents, then the output adapter.

    The decoder owns trainable output queries of shape `output_adapter.output_shape`; `forward` may be
    given other queries instead (for example a slice of them, or queries built from the inputs).

    Args:
        output_adapter: maps decoded queries `(B, Q, E)` to task outputs.
        latent_shape: `(num_latents, num_latent_channels)` of the encoder.
        num_cross_attention_heads: heads of the decoder cross-attention.
        num_qk_channels / num_v_channels: attention widths (the query width when `None`).
        widening_factor: MLP widening factor.
        use_query_residual: add the queries back after cross-attention.
        dropout / attention_dropout: residual-branch and attention-probability dropout.
        init_scale: standard deviation of the output queries' initialisation.
    """

    def __init__(
        self,
        output_adapter: OutputAdapter,
        latent_shape: tuple[int, int],
        num_cross_attention_heads: int = 4,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        init_scale: float = 0.02,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        num_queries, num_query_channels = output_adapter.output_shape
        self.init_scale = init_scale
        self.output_query = nn.Parameter(torch.empty(num_queries, num_query_channels))
        self.cross_attention = PerceiverCrossAttentionLayer(
            num_cross_attention_heads,
            num_query_channels,
            latent_shape[1],
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            widening_factor=widening_factor,
            use_query_residual=use_query_residual,
            dropout=dropout,
            attention_dropout=attention_dropout,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            attn_implementation=attn_implementation,
        )
        self.output_adapter = output_adapter
        self.reset_output_query()

    def reset_output_query(self) -> None:
        nn.init.trunc_normal_(self.output_query, std=self.init_scale, a=-2 * self.init_scale, b=2 * self.init_scale)

    def forward(
        self,
        x_latent: torch.Tensor,
        output_query: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> PerceiverDecoderOutput:
        """
        Args:
            x_latent: encoder latents `(B, L, D)`.
            output_query: `(B, Q, E)` or `(Q, E)` queries; the trainable queries when `None`.
        """
        _check_features("x_latent", x_latent, self.cross_attention.kv_norm.normalized_shape[0])
        b = x_latent.shape[0]
        if output_query is None:
            output_query = self.output_query
        if output_query.ndim == 2:
            output_query = output_query.expand(b, -1, -1)  # (B, Q, E)
        _check_features("output_query", output_query, self.cross_attention.q_norm.normalized_shape[0], batch_size=b)
        decoded, weights = self._run_layer(self.cross_attention, output_query, x_latent, None, output_attentions)
        return PerceiverDecoderOutput(
            logits=self.output_adapter(decoded), last_hidden_state=decoded, cross_attentions=weights
        )


class PerceiverIO(nn.Module):
    """A Perceiver IO model composed from an encoder and a decoder: `inputs -> latents -> outputs`.

    ```python
    >>> model = PerceiverIO(encoder, decoder)
    >>> logits = model(images)  # e.g. (B, 28, 28, 1) -> (B, 10)
    ```
    """

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder) -> None:
        super().__init__()
        if encoder.latent_shape[1] != decoder.cross_attention.kv_norm.normalized_shape[0]:
            raise ValueError(
                f"encoder latent channels ({encoder.latent_shape[1]}) differ from the decoder's "
                f"({decoder.cross_attention.kv_norm.normalized_shape[0]})"
            )
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x_latent = self.encoder(inputs, attention_mask=attention_mask).last_hidden_state
        return self.decoder(x_latent).logits


# ---------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------


def input_adapter_from_config(config: PerceiverConfig) -> InputAdapter:
    """Build the input adapter that `config.input_adapter` names."""
    if config.input_adapter == "text":
        return TextInputAdapter(config.vocab_size, config.max_position_embeddings, config.d_model)
    if config.input_adapter == "image":
        height, width = config.image_size
        return ImageInputAdapter(
            image_shape=(height, width, config.num_channels),
            num_frequency_bands=config.num_frequency_bands,
            max_frequencies=None if config.max_frequency is None else (config.max_frequency,) * 2,
            position_encoding=config.image_position_encoding,
            preprocessing=config.image_preprocessing,
            spatial_downsample=config.spatial_downsample,
            num_projection_channels=config.image_projection_channels,
            num_position_channels=config.image_position_channels or DEFAULT_LEARNED_POSITION_CHANNELS,
            num_position_projection_channels=config.image_position_projection_channels,
            conv_padding=config.image_conv_padding,
        )
    if config.input_adapter == "audio":
        return AudioInputAdapter(
            max_samples=config.max_audio_samples,
            patch_size=config.audio_patch_size,
            num_audio_channels=config.num_audio_channels,
            num_frequency_bands=config.num_frequency_bands,
            max_frequency=config.max_frequency,
            num_projection_channels=config.audio_projection_channels,
            preprocessing=config.audio_preprocessing,
        )
    if config.input_adapter == "multimodal":
        return MultimodalInputAdapter(config.modalities, num_layers=config.num_cross_attention_layers)
    raise ValueError(f"input_adapter ({config.input_adapter!r}) is not supported")


def _attn_implementation(config: PerceiverConfig) -> str:
    # transformers resolves `attn_implementation=` of from_pretrained / from_config into the config.
    return config._attn_implementation or "sdpa"


def _resized_table(old: nn.Parameter, num_rows: int, init_new_rows) -> nn.Parameter:
    """A `(num_rows, C)` copy of the table `old`: its first `min(old rows, num_rows)` rows are kept, the others
    come from `init_new_rows` (an in-place `nn.init` function); trainable iff `old` is, so a frozen part stays
    frozen."""
    new = torch.empty(num_rows, old.shape[1], device=old.device, dtype=old.dtype)
    init_new_rows(new)
    num_kept = min(old.shape[0], num_rows)
    with torch.no_grad():
        new[:num_kept] = old[:num_kept]
    return nn.Parameter(new, requires_grad=old.requires_grad)


class PerceiverPreTrainedModel(PreTrainedModel):
    """Base class of the Perceiver IO models: weight initialisation, attention choice, checkpointing."""

    config_class = PerceiverConfig
    config: PerceiverConfig
    base_model_prefix = "perceiver"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["PerceiverCrossAttentionLayer", "PerceiverSelfAttentionLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with an error that names the checkpoint when its safetensors file is
        truncated or tampered with (safetensors only says "Error while deserializing header: ...")."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"cannot load the weights of {str(pretrained_model_name_or_path)!r}: a safetensors file there is "
                f"truncated or corrupted ({error}); save or download the model again"
            ) from error

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        std = self.config.initializer_range
        super()._init_weights(module)
        if isinstance(module, PerceiverEncoder):
            init.trunc_normal_(module.latent, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, PerceiverDecoder):
            init.trunc_normal_(module.output_query, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, LearnedPositionEncoding):
            init.normal_(module.weight, std=std)

    def freeze_encoder(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze) the input adapter and encoder: their weights get no gradients, so an
        optimizer leaves them unchanged. Sets `config.freeze_encoder` so the choice is saved."""
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(not freeze)
            if freeze:
                # A stale gradient would still be applied (with weight decay) by the next optimizer step.
                parameter.grad = None
        self.config.freeze_encoder = freeze

    def unfreeze_encoder(self) -> None:
        """Make the input adapter and encoder trainable again."""
        self.freeze_encoder(False)

    def set_attn_implementation(self, attn_implementation: str, **kwargs) -> None:
        """Switch every attention module between `"sdpa"` and `"eager"`."""
        _check_attn_implementation(attn_implementation)
        self.config._attn_implementation_internal = attn_implementation
        for module in self.modules():
            if isinstance(module, PerceiverAttention):
                module.attn_implementation = attn_implementation

    def get_position_embeddings(self) -> LearnedPositionEncoding:
        """The learned position table `(max_position_embeddings, d_model)` of a text model."""
        adapter = self.base_model.encoder.input_adapter
        if not isinstance(adapter, TextInputAdapter):
            raise ValueError(
                f"only text models (input_adapter='text') have learned token positions; this model's input_adapter "
                f"is {self.config.input_adapter!r}"
            )
        return adapter.position_embedding

    def resize_position_embeddings(self, new_num_position_embeddings: int) -> None:
        """Give a text model `new_num_position_embeddings` learned positions, e.g. to fine-tune a masked LM
        pre-trained on short sequences with longer ones (as DistilBERT's method of the same name).

        The first `min(old, new)` positions keep their trained values; added positions are initialised as in
        a new model (normal, std `config.initializer_range`). Updates `config.max_position_embeddings`, so
        `save_pretrained` / `from_pretrained` round-trip the new size.
        """
        if not isinstance(new_num_position_embeddings, int) or new_num_position_embeddings < 1:
            raise ValueError(
                f"new_num_position_embeddings must be a positive integer, got {new_num_position_embeddings!r}"
            )
        positions = self.get_position_embeddings()
        std = self.config.initializer_range
        positions.weight = _resized_table(
            positions.weight, new_num_position_embeddings, partial(nn.init.normal_, std=std)
        )
        self.config.max_position_embeddings = new_num_position_embeddings


class PerceiverModel(PerceiverPreTrainedModel):
    """The Perceiver IO encoder with its input adapter: inputs -> latents `(B, L, D)`."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.encoder = PerceiverEncoder(
            input_adapter_from_config(config),
            latent_shape=(config.num_latents, config.d_latents),
            num_cross_attention_layers=config.num_cross_attention_layers,
            num_self_attention_blocks=config.num_self_attention_blocks,
            num_self_attention_layers_per_block=config.num_self_attention_layers_per_block,
            num_cross_attention_heads=config.num_cross_attention_heads,
            num_self_attention_heads=config.num_self_attention_heads,
            cross_attention_qk_channels=config.cross_attention_qk_channels,
            cross_attention_v_channels=config.cross_attention_v_channels,
            self_attention_qk_channels=config.self_attention_qk_channels,
            self_attention_v_channels=config.self_attention_v_channels,
            cross_attention_widening_factor=config.cross_attention_widening_factor,
            self_attention_widening_factor=config.self_attention_widening_factor,
            use_query_residual=config.use_query_residual,
            first_cross_attention_layer_shared=config.first_cross_attention_layer_shared,
            first_self_attention_block_shared=config.first_self_attention_block_shared,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            init_scale=config.initializer_range,
            attn_implementation=_attn_implementation(config),
        )
        self.post_init()

    @property
    def input_adapter(self) -> InputAdapter:
        return self.encoder.input_adapter

    def get_input_embeddings(self) -> nn.Module | None:
        adapter = self.encoder.input_adapter
        return adapter.token_embedding if isinstance(adapter, TextInputAdapter) else None

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.input_adapter.token_embedding = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithCrossAttentions | tuple:
        """
        Args:
            input_ids: `(B, N)` token ids (text adapter).
            attention_mask: `(B, N)`, 1 for tokens, 0 for padding.
            pixel_values: `(B, C, H, W)` or `(B, H, W, C)` images (image adapter).
            inputs: raw inputs for any adapter (instead of `input_ids` / `pixel_values`).
            interpolate_pos_encoding: resize learned image positions to images of another size than
                configured (bicubic, as transformers'); Fourier features need no resizing.

        Returns:
            `BaseModelOutputWithCrossAttentions` whose `last_hidden_state` is the latents `(B, L, D)`.
        """
        given = {k: v for k, v in (("input_ids", input_ids), ("pixel_values", pixel_values), ("inputs", inputs))
                 if v is not None}  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"pass exactly one of input_ids, pixel_values or inputs, got {sorted(given) or 'none'}")
        (raw_inputs,) = given.values()
        if pixel_values is not None and pixel_values.is_floating_point() and pixel_values.dtype != self.dtype:
            # float64 pixels (from numpy) or float32 pixels for a half-precision model would fail deep inside a
            # matmul or LayerNorm; transformers' image models cast them to the model's dtype too.
            raw_inputs = pixel_values.to(self.dtype)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        adapter_kwargs = {}
        if interpolate_pos_encoding:
            if not isinstance(self.input_adapter, ImageInputAdapter):
                raise ValueError(
                    "interpolate_pos_encoding=True applies to image models (input_adapter='image'), "
                    f"this model's input_adapter is {self.config.input_adapter!r}"
                )
            adapter_kwargs["interpolate_pos_encoding"] = True
        outputs = self.encoder(
            raw_inputs,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **adapter_kwargs,
        )
        return outputs if return_dict else outputs.to_tuple()


class PerceiverForMaskedLM(PerceiverPreTrainedModel):
    """Perceiver IO masked language model (DeepMind's language Perceiver architecture).

    The decoder's output queries are learned per position (`max_position_embeddings` x `d_model`); for
    an input of length N the first N queries are decoded, so `logits` is `(B, N, vocab_size)`. In
    training mode with `labels`, only the labelled positions are decoded when
    `config.decode_masked_only` (identical loss, about 6x less decoder work at 15% masking); `logits`
    is then `None`.
    """

    _tied_weights_keys = {
        "decoder.output_adapter.linear.weight": "perceiver.encoder.input_adapter.token_embedding.weight"
    }

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        if config.input_adapter != "text":
            raise ValueError(f"PerceiverForMaskedLM needs input_adapter='text', got {config.input_adapter!r}")
        self.perceiver = PerceiverModel(config)
        self.decoder = PerceiverDecoder(
            TextOutputAdapter(config.vocab_size, config.max_position_embeddings, config.d_model),
            latent_shape=(config.num_latents, config.d_latents),
            num_cross_attention_heads=config.num_decoder_heads,
            num_qk_channels=config.decoder_qk_channels,
            num_v_channels=config.decoder_v_channels,
            widening_factor=config.decoder_widening_factor,
            # DeepMind's masked-LM decoder has no query residual: the position queries carry no content.
            use_query_residual=bool(config.decoder_use_query_residual),
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            init_scale=config.initializer_range,
            attn_implementation=_attn_implementation(config),
        )
        self.post_init()

    def resize_position_embeddings(self, new_num_position_embeddings: int) -> None:
        """Resize the input positions (see the base class) and the decoder's per-position output queries
        alike: the first `min(old, new)` queries keep their trained values, added ones are new."""
        super().resize_position_embeddings(new_num_position_embeddings)
        std = self.config.initializer_range
        init_query = partial(nn.init.trunc_normal_, std=std, a=-2 * std, b=2 * std)  # as in _init_weights
        self.decoder.output_query = _resized_table(self.decoder.output_query, new_num_position_embeddings, init_query)
        self.decoder.output_adapter.output_shape = tuple(self.decoder.output_query.shape)

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output_adapter.linear

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder.output_adapter.linear = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple:
        """
        Args:
            input_ids: `(B, N)` token ids, `N <= max_position_embeddings`.
            attention_mask: `(B, N)`, 1 for tokens, 0 for padding.
            labels: `(B, N)` target ids; -100 marks positions without a loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None:
            raise ValueError("input_ids is required")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
            )
        if labels is not None:
            labels = _check_class_ids("labels", labels, self.config.vocab_size, "vocab_size")
        encoded = self.perceiver(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        seq_len = input_ids.shape[1]
        queries = self.decoder.output_query[:seq_len]  # (N, E)

        decode_labelled_only = labels is not None and self.training and self.config.decode_masked_only
        if decode_labelled_only:
            # Move the labelled positions to the front of each row (stable sort keeps their order) and
            # decode the first K of them, K = most labels in a row. Rows with fewer labels decode a few
            # unlabelled positions whose target is -100, so the loss is exactly the full decoder's.
            is_labelled = labels != -100  # (B, N)
            num_decoded = max(int(is_labelled.sum(dim=1).max()), 1)
            positions = torch.argsort((~is_labelled).to(torch.int8), dim=1, stable=True)[:, :num_decoded]  # (B, K)
            queries = queries[positions]  # (B, K, E)
            labels = labels.gather(1, positions)  # (B, K)

        decoded = self.decoder(encoded.last_hidden_state, output_query=queries, output_attentions=output_attentions)
        logits = decoded.logits  # (B, N or K, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        output = MaskedLMOutput(
            loss=loss,
            logits=None if decode_labelled_only else logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()


def _check_class_ids(name: str, labels: torch.Tensor, num_classes: int, size_name: str) -> torch.Tensor:
    """Return integer `labels` as int64 after checking they are in `[0, num_classes)` or -100 (no loss): an id out
    of range fails deep inside `cross_entropy` (IndexError on CPU, a device assert on GPU)."""
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer ids (-100 for no loss), got dtype {labels.dtype}")
    if labels.numel() and not torch.compiler.is_compiling():  # a data-dependent check, skipped when compiled
        wrong = (labels != -100) & ((labels < 0) | (labels >= num_classes))
        if wrong.any():
            raise ValueError(
                f"{name} must be ids in [0, {size_name}={num_classes}) or -100 (no loss), "
                f"got {labels[wrong][:8].tolist()}"
            )
    return labels.long()


def _classification_loss(config: PerceiverConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of a classification head, chosen by `config.problem_type` as in transformers' heads."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if config.num_labels == 1:
            if labels.numel() != logits.shape[0]:
                raise ValueError(
                    f"regression labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}"
                )
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().reshape(logits.shape[0]))
        if labels.shape != logits.shape:  # one regression target per label
            raise ValueError(f"regression labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
        if not labels.is_floating_point():  # float class ids (e.g. 1.0) keep working, as in transformers
            labels = _check_class_ids("labels", labels, config.num_labels, "num_labels")
        return F.cross_entropy(logits.float(), labels.long())
    if labels.shape != logits.shape:
        raise ValueError(f"multi-label labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class _PerceiverClassificationModel(PerceiverPreTrainedModel):
    """Encoder, then learned queries cross-attending to the latents, then a classification adapter.

    The decoder is named `classification_decoder` (not `decoder`) so that loading a masked-LM
    checkpoint keeps the adapter and encoder and reports the new decoder as newly initialised.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.perceiver = PerceiverModel(config)
        self.classification_decoder = PerceiverDecoder(
            ClassificationOutputAdapter(
                config.num_labels,
                num_outputs=config.num_output_queries,
                num_output_channels=config.d_output_queries or config.d_latents,
            ),
            latent_shape=(config.num_latents, config.d_latents),
            num_cross_attention_heads=config.num_decoder_heads,
            num_qk_channels=config.decoder_qk_channels,
            num_v_channels=config.decoder_v_channels,
            widening_factor=config.decoder_widening_factor,
            use_query_residual=config.decoder_use_query_residual is not False,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            init_scale=config.initializer_range,
            attn_implementation=_attn_implementation(config),
        )
        self.post_init()
        if getattr(config, "freeze_encoder", False):
            self.freeze_encoder()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then re-applies `config.freeze_encoder`.

        transformers (5.x) replaces every parameter while it loads weights, which resets `requires_grad`
        to `True`, so the freeze applied in `__init__` would not survive loading.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        if model.config.freeze_encoder:
            model.freeze_encoder()
        return loaded

    def _classify(
        self,
        encoded: BaseModelOutputWithCrossAttentions,
        labels: torch.Tensor | None,
        output_attentions: bool | None,
        return_dict: bool,
        output_cls: type[SequenceClassifierOutput] | type[ImageClassifierOutput],
    ) -> SequenceClassifierOutput | ImageClassifierOutput | tuple:
        decoded = self.classification_decoder(encoded.last_hidden_state, output_attentions=bool(output_attentions))
        logits = decoded.logits
        if logits.ndim == 3:  # several output queries: average their logits
            logits = logits.mean(dim=1)  # (B, K)
        loss = None if labels is None else _classification_loss(self.config, logits, labels)
        output = output_cls(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return output if return_dict else output.to_tuple()


class PerceiverForSequenceClassification(_PerceiverClassificationModel):
    """Perceiver IO text classifier: `input_ids` -> `(B, num_labels)` logits, loss from `labels`
    (single-label, multi-label or regression by `config.problem_type`).

    Inputs longer than `config.max_position_embeddings` are cut to their first
    `max_position_embeddings` tokens (with a warning) instead of failing, so that
    `pipeline("text-classification")` classifies long reviews with no extra argument. Tokenizing with
    `truncation=True` (the tokenizer's `model_max_length`) truncates before the model and keeps `[SEP]`.
    """

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """
        Args:
            input_ids: `(B, N)` token ids; positions beyond `max_position_embeddings` are dropped.
            attention_mask: `(B, N)`, 1 for tokens, 0 for padding.
            labels: `(B,)` class ids (single-label), `(B, num_labels)` multi-hot floats (multi-label), or
                `(B,)` / `(B, num_labels)` floats (regression).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None:
            raise ValueError("input_ids is required")
        max_len = self.config.max_position_embeddings
        if input_ids.ndim == 2 and input_ids.shape[1] > max_len:
            logger.warning_once(
                f"input_ids of length {input_ids.shape[1]} is cut to the model's {max_len} positions "
                "(max_position_embeddings); tokenize with truncation=True to truncate before the model"
            )
            input_ids = input_ids[:, :max_len]
            attention_mask = None if attention_mask is None else attention_mask[:, :max_len]
        encoded = self.perceiver(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return self._classify(encoded, labels, output_attentions, return_dict, SequenceClassifierOutput)


class PerceiverForImageClassification(_PerceiverClassificationModel):
    """Perceiver IO image classifier: `pixel_values` `(B, C, H, W)` or `(B, H, W, C)` -> `(B, num_labels)`."""

    main_input_name = "pixel_values"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> ImageClassifierOutput | tuple:
        """`interpolate_pos_encoding`: resize learned positions to images of another size than configured."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        encoded = self.perceiver(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return self._classify(encoded, labels, output_attentions, return_dict, ImageClassifierOutput)
