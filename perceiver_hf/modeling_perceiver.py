"""Perceiver IO: attention, encoder, decoder, and the Hugging Face models built from them.

Everything here is built from a `PerceiverConfig`: the config flows down into every block, and each block takes
the config plus the few dimensions that differ between its uses (the query width of a decoder, the heads of a
cross-attention layer). The older Perceiver APIs (`perceiver_hf.perceiver`, `perceiver_hf.perceiver_pytorch`)
translate their arguments into a config and run these same blocks.

Notation used in the shape comments:
    B  batch                    N  input positions            C  input channels
    L  latents (num_latents)    D  latent channels (d_latents)
    Q  output queries           E  output query channels
    H  attention heads          Dk / Dv  query-key / value channels per head
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .adapters import (
    ClassificationOutputAdapter,
    ImageInputAdapter,
    InputAdapter,
    OutputAdapter,
    TextInputAdapter,
    TextOutputAdapter,
    _require_positive_int,
)
from .configuration_perceiver import INPUT_ADAPTERS, PerceiverConfig
from .position_encoding import LearnedPositionEncoding

__all__ = [
    "PerceiverAttention",
    "PerceiverMLP",
    "PerceiverCrossAttentionLayer",
    "PerceiverSelfAttentionLayer",
    "PerceiverEncoder",
    "PerceiverDecoder",
    "PerceiverDecoderOutput",
    "PerceiverMaskedLMOutput",
    "PerceiverClassifierOutput",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "input_adapter_from_config",
    "eager_attention_forward",
    "apply_rotary_position_embeddings",
]

logger = logging.get_logger(__name__)


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


def _or(value, default):
    """`value`, or `default` when it is `None` (a setting that defaults to another one)."""
    return default if value is None else value


def apply_rotary_position_embeddings(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `R` channels of each head of `x` `(B, H, n, Dh)` by the angles of `cos`/`sin` `(B, n, R)`
    (rotary position embedding, Su et al. 2021, in the split-halves form of transformers' Llama); the other
    `Dh - R` channels pass unchanged (partial rotary)."""
    rotated = cos.shape[-1]
    x_rot, x_pass = x[..., :rotated], x[..., rotated:]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, n, R): the same angles for every head
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


HALF_PRECISIONS = (torch.bfloat16, torch.float16)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    inverted: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit softmax, in transformers' attention-interface form.

    `query` `(B, H, Nq, Dk)`, `key` `(B, H, Nkv, Dk)`, `value` `(B, H, Nkv, Dv)`; `attention_mask` boolean,
    broadcastable to `(B, H, Nq, Nkv)`, True where a query may attend. `inverted`: lucidrains' inverted attention
    (after slot attention): the softmax runs over the queries, so that the latents compete for each input, then
    each query's weights are renormalised to sum to 1. Returns the output `(B, Nq, H, Dv)` and the attention
    weights `(B, H, Nq, Nkv)`.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Nq, Nkv)
    # Half-precision scores keep their dtype through the softmax: its kernels accumulate in fp32 whatever the
    # dtype, and an fp32 copy of the weights would only be cast back (two more passes over Nq x Nkv per head).
    softmax_dtype = None if scores.dtype in HALF_PRECISIONS else torch.float32
    if inverted:
        weights = scores.softmax(dim=-2, dtype=softmax_dtype).to(query.dtype)
        if attention_mask is not None:
            weights = weights.masked_fill(~attention_mask, 0.0)
        weights = F.normalize(weights, p=1, dim=-1, eps=1e-8)
    else:
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1, dtype=softmax_dtype).to(query.dtype)
    out = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)  # (B, H, Nq, Dv)
    return out.transpose(1, 2), weights


# On CPU in bf16/fp16, SDPA's flash-attention kernel is slower than two half-precision matmuls with a softmax
# between them while the keys are few; with many keys (a 224x224 image's 50,176 pixels) it is as fast and does not
# materialise the (B, H, Nq, Nkv) scores; in fp32 it is faster. The training-step measurements behind the limit:
# benchmarks/README.md, "Attention kernel per dtype and shape".
MATMUL_ATTENTION_MAX_KEYS = 2048


def sdpa_prefers_matmul(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether "sdpa" attention of `query` `(B, H, Nq, Dk)` over `key` `(B, H, Nkv, Dk)` runs faster as eager
    matmuls (the same result): on CPU, in half precision, with at most `MATMUL_ATTENTION_MAX_KEYS` keys."""
    return query.device.type == "cpu" and query.dtype in HALF_PRECISIONS and key.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS


class PerceiverAttention(nn.Module):
    """Multi-head attention with separate query-key and value widths. Never causal by itself: a causal model
    (Perceiver AR) passes its causal mask as a per-query `attention_mask`, plus rotary embeddings and a cache.

    The attention itself runs through transformers' attention interface, chosen by `config._attn_implementation`
    ("sdpa" by default, "eager", or any kernel transformers registers); `output_attentions=True` runs the eager
    path, which returns the weights. "sdpa" on CPU in half precision over few keys runs the eager matmuls, which
    are faster there (`sdpa_prefers_matmul`). `config.qkv_bias` gives the query, key and value projections a bias
    (DeepMind and transformers: yes; lucidrains' perceiver-pytorch: no).

    Args:
        config: the model's config (`qkv_bias`, `attention_dropout`, the attention implementation).
        num_heads: number of heads `H`.
        q_channels / kv_channels: widths of the query and key/value inputs.
        qk_channels: query-key width, split over heads (`q_channels` when `None`).
        v_channels: value width, split over heads (`qk_channels` when `None`).
        out_channels: width of the output projection (`q_channels` when `None`).
    """

    # transformers' attention integrations treat a module without this flag as causal.
    is_causal = False

    def __init__(
        self,
        config: PerceiverConfig,
        num_heads: int,
        q_channels: int,
        kv_channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        qk_channels = qk_channels or q_channels
        v_channels = v_channels or qk_channels
        out_channels = out_channels or q_channels
        for name, value in (
            ("num_heads", num_heads), ("q_channels", q_channels), ("kv_channels", kv_channels),
            ("qk_channels", qk_channels), ("v_channels", v_channels), ("out_channels", out_channels),
        ):  # fmt: skip
            _require_positive_int(name, value)
        for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if channels % num_heads != 0:
                raise ValueError(f"{name} ({channels}) must be divisible by num_heads ({num_heads})")
        self.config = config
        self.num_heads = num_heads
        self.qk_head_channels = qk_channels // num_heads
        self.v_head_channels = v_channels // num_heads
        self.scaling = self.qk_head_channels**-0.5
        self.q_proj = nn.Linear(q_channels, qk_channels, bias=config.qkv_bias)
        self.k_proj = nn.Linear(kv_channels, qk_channels, bias=config.qkv_bias)
        self.v_proj = nn.Linear(kv_channels, v_channels, bias=config.qkv_bias)
        self.o_proj = nn.Linear(v_channels, out_channels)

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
        inverted: bool = False,
        position_embeddings: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        past_key_values: Cache | None = None,
        layer_idx: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x_q: queries `(B, Nq, Cq)`.
            x_kv: keys/values `(B, Nkv, Ckv)`; may be `None` when `kv` is given.
            attention_mask: `(B, Nkv)`, 1 (or True) for positions to attend to, 0 for padding; or `(B, Nq, Nkv)`
                with one row per query (causal masks). With a cache, `Nkv` counts the cached positions too.
            output_attentions: also return the attention weights `(B, H, Nq, Nkv)` (computed eagerly).
            kv: keys and values from `project_kv(x_kv)`, to reuse them across calls.
            inverted: inverted attention (see `eager_attention_forward`) instead of the softmax over keys.
            position_embeddings: rotary embeddings `((cos_q, sin_q), (cos_k, sin_k))`, `(B, Nq, R)` and
                `(B, Nkv, R)`, applied to the queries and to the new keys (see `apply_rotary_position_embeddings`).
            past_key_values: a transformers `Cache`: the new keys and values are appended to layer `layer_idx`
                and the queries attend to all of them (generation with a key/value cache).

        Returns:
            `(output (B, Nq, out_channels), attention weights or None)`.
        """
        _check_features("x_q", x_q, self.q_proj.in_features)
        if kv is None:
            _check_features("x_kv", x_kv, self.k_proj.in_features, batch_size=x_q.shape[0])
            if x_kv.shape[1] == 0:  # SDPA would silently return zeros: attention over nothing is undefined
                raise ValueError(f"x_kv must hold at least one position to attend to, got shape {tuple(x_kv.shape)}")
        q = self._split_heads(self.q_proj(x_q), self.qk_head_channels)  # (B, H, Nq, Dk)
        k, v = kv if kv is not None else self.project_kv(x_kv)  # (B, H, Nkv, Dk), (B, H, Nkv, Dv)
        if position_embeddings is not None:
            (cos_q, sin_q), (cos_k, sin_k) = position_embeddings
            q = apply_rotary_position_embeddings(q, cos_q, sin_q)
            k = apply_rotary_position_embeddings(k, cos_k, sin_k)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, layer_idx)  # cached and new positions
        if attention_mask is None:
            keep = None
        elif attention_mask.ndim == 3:
            keep = attention_mask.bool()[:, None]  # (B, 1, Nq, Nkv)
        else:
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Nkv)

        # The weights are only returned by the eager path; a module used outside a PreTrainedModel (the older APIs'
        # translators) has no implementation set and takes SDPA.
        implementation = "eager" if output_attentions else self.config._attn_implementation or "sdpa"
        if implementation == "sdpa" and sdpa_prefers_matmul(q, k):
            implementation = "eager"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if inverted:  # only the eager function has inverted attention
            attention = partial(eager_attention_forward, inverted=True)
        out, weights = attention(
            self,
            q,
            k,
            v,
            keep,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        b, nq = out.shape[:2]
        out = out.reshape(b, nq, self.num_heads * self.v_head_channels)  # (B, Nq, H*Dv)
        return self.o_proj(out), weights if output_attentions else None


class PerceiverMLP(nn.Module):
    """Pre-LayerNorm MLP: `LayerNorm -> Linear(C, w*C) -> GELU (or GEGLU) -> [dropout] -> Linear(w*C, C) -> dropout`.

    `config.hidden_act` chooses GELU or GEGLU (lucidrains': half of a doubled hidden layer gated by the GELU of
    the other half); `widening_factor` is the hidden width as a multiple of `channels`.
    """

    def __init__(self, config: PerceiverConfig, channels: int, widening_factor: int) -> None:
        super().__init__()
        hidden = widening_factor * channels
        self.gated = config.hidden_act == "geglu"
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(channels, 2 * hidden if self.gated else hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.hidden_dropout = nn.Dropout(config.mlp_hidden_dropout)
        self.dropout = nn.Dropout(_or(config.mlp_output_dropout, config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.dropout(self.fc2(self.hidden_dropout(h)))


def _runs_plain_linear(module: nn.Module) -> bool:
    """Whether calling `module` is exactly `F.linear(x, weight, bias)`: an `nn.Linear` itself (not a PEFT LoRA
    layer, a quantized or parametrized linear), with no forward hooks of its own or global ones."""
    return (
        type(module) is nn.Linear
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


class PerceiverCrossAttentionLayer(nn.Module):
    """Cross-attention from queries to key/value inputs, then an MLP, each with a residual.

    `x = attention(LN(x_q), LN(x_kv)) [+ x_q]; x = x + MLP(x)`, as in DeepMind's Perceiver IO. The query
    residual is optional (DeepMind's masked-LM decoder has none), and so is the MLP (lucidrains' Perceiver IO
    decoder has none unless `decoder_ff=True`).
    """

    def __init__(
        self,
        config: PerceiverConfig,
        num_heads: int,
        q_channels: int,
        kv_channels: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        use_mlp: bool = True,
    ) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(q_channels, eps=config.layer_norm_eps)
        self.kv_norm = nn.LayerNorm(kv_channels, eps=config.layer_norm_eps)
        self.attention = PerceiverAttention(config, num_heads, q_channels, kv_channels, qk_channels, v_channels)
        self.dropout = nn.Dropout(_or(config.attention_output_dropout, config.dropout))
        self.use_query_residual = use_query_residual
        self.mlp = PerceiverMLP(config, q_channels, widening_factor) if use_mlp else None

    def project_kv(self, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, projected keys and values of `x_kv`, reusable across calls of this layer."""
        norm, attn = self.kv_norm, self.attention
        foldable = (
            not x_kv.requires_grad
            and norm.weight is not None
            and _runs_plain_linear(attn.k_proj)
            and _runs_plain_linear(attn.v_proj)
        )
        if not foldable:
            return attn.project_kv(norm(x_kv))
        # Inputs without gradient (pixels and Fourier features): the LayerNorm's affine is folded into the
        # projections, `W (g * x_hat + b) + c = (W * g) x_hat + (W b + c)`, so the backward pass skips the
        # (N, Ckv) input gradient that only the LayerNorm's weight and bias would use (-19% of a 224x224
        # image training step). Exact only for plain linear layers: an adapter (PEFT LoRA), a quantized layer
        # or a hook on the projections is called as itself instead.
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
        inverted: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_kwargs`: rotary `position_embeddings` and a key/value cache, see `PerceiverAttention`."""
        _check_features("x_q", x_q, self.q_norm.normalized_shape[0])
        if kv is None:
            _check_features("x_kv", x_kv, self.kv_norm.normalized_shape[0], batch_size=x_q.shape[0])
            kv = self.project_kv(x_kv)
        attended, weights = self.attention(
            self.q_norm(x_q), None, attention_mask, output_attentions, kv, inverted, **attention_kwargs
        )
        x = self.dropout(attended)
        if self.use_query_residual:
            x = x + x_q
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x, weights  # (B, Nq, Cq)


class PerceiverSelfAttentionLayer(nn.Module):
    """Self-attention then an MLP, each pre-LayerNorm with a residual; widths and heads from the config's
    `self_attention_*` settings, or given (`channels`, `num_heads`) for other uses."""

    def __init__(self, config: PerceiverConfig, channels: int | None = None, num_heads: int | None = None) -> None:
        super().__init__()
        channels = channels or config.d_latents
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.attention = PerceiverAttention(
            config,
            num_heads or config.num_self_attention_heads,
            channels,
            channels,
            qk_channels=config.self_attention_qk_channels,
            v_channels=config.self_attention_v_channels,
        )
        self.dropout = nn.Dropout(_or(config.attention_output_dropout, config.dropout))
        self.mlp = PerceiverMLP(config, channels, config.self_attention_widening_factor)

    def forward(
        self,
        x: torch.Tensor,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask`, rotary `position_embeddings` and a key/value cache: see `PerceiverAttention`
        (a causal mask makes this causal self-attention)."""
        _check_features("x", x, self.norm.normalized_shape[0])
        normed = self.norm(x)
        attended, weights = self.attention(normed, normed, attention_mask, output_attentions, **attention_kwargs)
        x = x + self.dropout(attended)
        return x + self.mlp(x), weights  # (B, L, D)


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

    The encoder runs `num_self_attention_blocks` blocks of `num_self_attention_layers_per_block` self-attention
    layers; a cross-attention layer precedes each of the first `num_cross_attention_layers` blocks. Which layers
    share weights is `config.weight_sharing`: each layer position names a weight set, and positions naming the
    same set run the same module object (stored once, under the position that uses it first: `cross_attention.i`
    for cross-attention layer `i`, `self_attention.b_j` for layer `j` of block `b`).

    - DeepMind's Perceiver IO: one cross-attention layer, the same block repeated;
    - the original Perceiver (krasserm's `num_layers`, lucidrains' `weight_tie_layers=True`): layer and block 1
      own weights, layers and blocks 2.. share one set;
    - lucidrains without weight tying: every layer its own weights; the multi-modality fork: its own pattern.

    Args:
        config: the model's config.
        input_adapter: maps raw inputs to `(B, N, C)`; `None` to take adapted inputs `(B, N,
            config.num_input_channels)` directly.
    """

    def __init__(self, config: PerceiverConfig, input_adapter: InputAdapter | None = None) -> None:
        super().__init__()
        num_input_channels = input_adapter.num_input_channels if input_adapter is not None else None
        if num_input_channels is None:
            if config.input_adapter != "none":
                raise ValueError(
                    f"PerceiverEncoder needs an input adapter for input_adapter={config.input_adapter!r}; "
                    "pass one, or use input_adapter='none' with num_input_channels for adapted inputs"
                )
            num_input_channels = config.num_input_channels
        self.input_adapter = input_adapter
        self.num_input_channels = num_input_channels
        self.num_cross_attention_layers = config.num_cross_attention_layers
        self.cross_attention_inverted = config.cross_attention_inverted or [False] * config.num_cross_attention_layers
        self.self_attention_block_residual = config.self_attention_block_residual
        self.latent = nn.Parameter(torch.empty(config.num_latents, config.d_latents))
        self.init_scale = config.initializer_range

        cross_sharing, self_sharing = config.weight_sharing
        # Each layer position -> the key of the module it runs; a weight set is created at its first use.
        self.cross_attention = nn.ModuleDict()
        self.cross_attention_keys: list[str] = []
        first_use: dict[int, str] = {}
        for i, weight_set in enumerate(cross_sharing):
            if weight_set not in first_use:
                first_use[weight_set] = str(i)
                self.cross_attention[str(i)] = PerceiverCrossAttentionLayer(
                    config,
                    config.num_cross_attention_heads,
                    config.d_latents,
                    num_input_channels,
                    qk_channels=config.cross_attention_qk_channels,
                    v_channels=config.cross_attention_v_channels,
                    widening_factor=config.cross_attention_widening_factor,
                    use_query_residual=config.use_query_residual,
                )
            self.cross_attention_keys.append(first_use[weight_set])
        self.self_attention = nn.ModuleDict()
        self.self_attention_keys: list[list[str]] = []
        first_use = {}
        for b, block in enumerate(self_sharing):
            keys = []
            for j, weight_set in enumerate(block):
                if weight_set not in first_use:
                    first_use[weight_set] = f"{b}_{j}"
                    self.self_attention[f"{b}_{j}"] = PerceiverSelfAttentionLayer(config)
                keys.append(first_use[weight_set])
            self.self_attention_keys.append(keys)
        self.reset_latent()

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.latent.shape)

    def reset_latent(self) -> None:
        nn.init.trunc_normal_(self.latent, std=self.init_scale, a=-2 * self.init_scale, b=2 * self.init_scale)

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        inputs_are_adapted: bool = False,
        **adapter_kwargs,
    ) -> BaseModelOutputWithCrossAttentions:
        """
        Args:
            inputs: raw inputs for the input adapter, or adapted inputs `(B, N, C)` without one.
            inputs_are_adapted: the inputs are the input adapter's output already, and skip it (a head that also
                uses the adapted inputs, as the optical flow decoder's queries, adapts them once).
            attention_mask: `(B, N)`, 1 for input positions to attend to, 0 for padding. An adapter with
                `adapts_attention_mask = True` takes the caller's mask with the inputs and returns the `(B, N)`
                mask with its output (`(x, mask)`), e.g. audio samples -> patches, or a mask per modality.
            adapter_kwargs: options of the input adapter's forward (`interpolate_pos_encoding` of images).

        The inputs may be a list of `num_cross_attention_layers` arrays `(B, N, C)` instead of one (from the
        adapter or given directly): cross-attention layer `i` then attends to array `i` (e.g. text embedding
        channels split across layers).

        Returns:
            `BaseModelOutputWithCrossAttentions` with `last_hidden_state` the latents `(B, L, D)`;
            `hidden_states` the latents after each layer (and the initial array), `attentions` the
            self-attention weights and `cross_attentions` the cross-attention weights when requested.
        """
        if self.input_adapter is None or inputs_are_adapted:
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
                f"the inputs hold {len(layer_inputs)} per-layer arrays for "
                f"{self.num_cross_attention_layers} cross-attention layers"
            )
        x = layer_inputs[0]
        for layer_x in layer_inputs:
            if (
                not torch.is_tensor(layer_x)
                or layer_x.ndim != 3
                or layer_x.shape[-1] != self.num_input_channels
                or layer_x.shape[:2] != x.shape[:2]
            ):
                got = tuple(layer_x.shape) if torch.is_tensor(layer_x) else type(layer_x).__name__
                raise ValueError(
                    f"adapted inputs must have shape (batch, positions, {self.num_input_channels}), got {got}"
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
        shared_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for b_index, block_keys in enumerate(self.self_attention_keys):
            if b_index < self.num_cross_attention_layers:
                key = self.cross_attention_keys[b_index]
                cross_attention = self.cross_attention[key]
                layer_x = layer_inputs[b_index]
                kv = None
                if self.cross_attention_keys.count(key) > 1:
                    kv = shared_kv.get((key, id(layer_x)))  # the same weights and the same inputs
                    if kv is None:
                        kv = shared_kv[(key, id(layer_x))] = cross_attention.project_kv(layer_x)
                inverted = self.cross_attention_inverted[b_index]
                x_latent, weights = self._run_layer(
                    cross_attention, x_latent, layer_x, attention_mask, output_attentions, kv, inverted
                )
                if output_attentions:
                    cross_attentions.append(weights)
                if output_hidden_states:
                    all_hidden.append(x_latent)
            block_input = x_latent
            for key in block_keys:
                x_latent, weights = self._run_layer(self.self_attention[key], x_latent, output_attentions)
                if output_attentions:
                    self_attentions.append(weights)
                if output_hidden_states:
                    all_hidden.append(x_latent)
            if self.self_attention_block_residual:  # the multi-modality fork adds one around each block
                x_latent = x_latent + block_input
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
    given other queries instead (a slice of them, or queries built from the inputs). Heads, widths and the
    MLP come from the config's `decoder_*` settings.

    Args:
        config: the model's config.
        output_adapter: maps decoded queries `(B, Q, E)` to task outputs.
        use_query_residual: add the queries back after cross-attention (`config.decoder_use_query_residual`
            when it is set; otherwise this head's choice).
        learned_queries: own trainable queries; `False` for a head that always passes `output_query` (no unused
            parameter, and a clear error when none is passed).
    """

    def __init__(
        self,
        config: PerceiverConfig,
        output_adapter: OutputAdapter,
        use_query_residual: bool,
        learned_queries: bool = True,
    ) -> None:
        super().__init__()
        if config.decoder_use_query_residual is not None:
            use_query_residual = config.decoder_use_query_residual
        num_queries, num_query_channels = output_adapter.output_shape
        self.init_scale = config.initializer_range
        # A head that always passes its queries (optical flow: built from the inputs) owns none.
        self.output_query = nn.Parameter(torch.empty(num_queries, num_query_channels)) if learned_queries else None
        self.cross_attention = PerceiverCrossAttentionLayer(
            config,
            config.num_decoder_heads,
            num_query_channels,
            config.d_latents,
            qk_channels=config.decoder_qk_channels,
            v_channels=config.decoder_v_channels,
            widening_factor=config.decoder_widening_factor,
            use_query_residual=use_query_residual,
            use_mlp=config.decoder_use_mlp,
        )
        self.output_adapter = output_adapter
        self.reset_output_query()

    def reset_output_query(self) -> None:
        if self.output_query is None:
            return
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
            if self.output_query is None:
                raise ValueError("this decoder has no learned queries (learned_queries=False): pass output_query")
            output_query = self.output_query
        if output_query.ndim == 2:
            output_query = output_query.expand(b, -1, -1)  # (B, Q, E)
        _check_features("output_query", output_query, self.cross_attention.q_norm.normalized_shape[0], batch_size=b)
        decoded, weights = self._run_layer(self.cross_attention, output_query, x_latent, None, output_attentions)
        return PerceiverDecoderOutput(
            logits=self.output_adapter(decoded), last_hidden_state=decoded, cross_attentions=weights
        )


@dataclass
class PerceiverMaskedLMOutput(ModelOutput):
    """Output of `PerceiverForMaskedLM` (transformers' `MaskedLMOutput` plus `cross_attentions`).

    Args:
        loss: masked-LM cross-entropy when `labels` are given.
        logits: `(B, N, vocab_size)` (`None` when only the labelled positions were decoded).
        hidden_states: the latents after each encoder layer, when requested.
        attentions: the encoder's self-attention weights, when requested.
        cross_attentions: the encoder's cross-attention weights, then the decoder's, when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class PerceiverClassifierOutput(ModelOutput):
    """Output of the classification heads (transformers' `SequenceClassifierOutput` plus `cross_attentions`).

    Args:
        loss: classification (or regression) loss when `labels` are given.
        logits: `(B, num_labels)`.
        hidden_states / attentions / cross_attentions: as in `PerceiverMaskedLMOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def _cross_attentions(encoded: BaseModelOutputWithCrossAttentions, decoded: PerceiverDecoderOutput):
    """The encoder's cross-attention weights followed by the decoder's (as transformers' Perceiver), or `None`."""
    if encoded.cross_attentions is None:
        return None
    return encoded.cross_attentions + ((decoded.cross_attentions,) if decoded.cross_attentions is not None else ())


# ---------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------


def input_adapter_from_config(config: PerceiverConfig) -> InputAdapter | None:
    """Build the input adapter that `config.input_adapter` names (`None` for "none"; see `INPUT_ADAPTERS`)."""
    adapter_class = INPUT_ADAPTERS[config.input_adapter]
    return None if adapter_class is None else adapter_class.from_config(config)


# Release 0.1.0 stored the encoder's layers as `cross_attention_1` / `cross_attention_n` and `self_attention_1.j` /
# `self_attention_n.j` (layer/block 1, and the set shared by layers/blocks 2..); each is now stored under the
# position that first uses it. Renamed on load, so models saved by that release keep loading.
_RELEASE_0_1_KEY_MAPPING = {
    r"encoder\.cross_attention_1\.": "encoder.cross_attention.0.",
    r"encoder\.cross_attention_n\.": "encoder.cross_attention.1.",
    r"encoder\.self_attention_1\.(\d+)\.": r"encoder.self_attention.0_\1.",
    r"encoder\.self_attention_n\.(\d+)\.": r"encoder.self_attention.1_\1.",
}


def _to_dtype(inputs, dtype: torch.dtype):
    """Floating-point tensors of `inputs` (a tensor, or a dict or list of them) in `dtype`; others unchanged."""
    if isinstance(inputs, dict):
        return {name: _to_dtype(value, dtype) for name, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_dtype(value, dtype) for value in inputs)
    if torch.is_tensor(inputs) and inputs.is_floating_point() and inputs.dtype != dtype:
        return inputs.to(dtype)
    return inputs


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
        truncated or tampered with (safetensors only says "Error while deserializing header: ..."), and that
        renames the weights of models saved by release 0.1.0 to today's names."""
        kwargs["key_mapping"] = {**_RELEASE_0_1_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"cannot load the weights of {str(pretrained_model_name_or_path)!r}: a safetensors file there is "
                f"truncated or corrupted ({error}); save or download the model again"
            ) from error
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        # transformers would apply the renaming in reverse on save; a model saves under today's names.
        model._weight_conversions = [
            c for c in getattr(model, "_weight_conversions", None) or [] if type(c).__name__ != "WeightRenaming"
        ]
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        std = self.config.initializer_range
        super()._init_weights(module)
        if isinstance(module, PerceiverEncoder):
            init.trunc_normal_(module.latent, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, PerceiverDecoder) and module.output_query is not None:
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
        self.encoder = PerceiverEncoder(config, input_adapter_from_config(config))
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
        input_values: torch.Tensor | None = None,
        inputs: torch.Tensor | dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithCrossAttentions | tuple:
        """Takes what this package's processors return, by the names they use.

        Args:
            input_ids: `(B, N)` token ids (text adapter; the tokenizer's output).
            attention_mask: `(B, N)`, 1 for tokens, 0 for padding (audio: per sample; multimodal: a dict of masks).
            pixel_values: `(B, C, H, W)` or `(B, H, W, C)` images (image adapter; the image processor's output).
            input_values: `(B, T)` or `(B, T, A)` waveforms (audio adapter; the feature extractor's output).
            inputs: raw inputs for any adapter, e.g. `{modality: tensor}` for the multimodal adapter.
            inputs_embeds: adapted inputs `(B, N, C)` (or a list of one per cross-attention layer), which skip
                the input adapter; what `input_adapter="none"` models take.
            interpolate_pos_encoding: resize learned image positions to images of another size than
                configured (bicubic, as transformers'); Fourier features need no resizing.

        Returns:
            `BaseModelOutputWithCrossAttentions` whose `last_hidden_state` is the latents `(B, L, D)`.
        """
        candidates = {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "input_values": input_values,
            "inputs": inputs,
            "inputs_embeds": inputs_embeds,
        }
        given = {name: value for name, value in candidates.items() if value is not None}
        if len(given) != 1:
            raise ValueError(f"pass exactly one of {list(candidates)}, got {sorted(given) or 'none'}")
        ((given_name, raw_inputs),) = given.items()
        if (given_name == "inputs_embeds") != (self.input_adapter is None):
            expected = "inputs_embeds" if self.input_adapter is None else f"raw inputs, not {given_name}"
            raise ValueError(f"this model's input_adapter is {self.config.input_adapter!r}: it takes {expected}")
        # float64 data (from numpy) or float32 data for a half-precision model would fail deep inside a matmul or
        # LayerNorm: float inputs take the model's dtype, as in transformers' image models (token ids stay ids).
        raw_inputs = _to_dtype(raw_inputs, self.dtype)
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

    With `config.mlm_decoder_queries="positions"` (DeepMind's layout) the decoder's output queries are learned
    per position (`max_position_embeddings` x `d_model`) and the first N of them are decoded for an input of
    length N; with `"inputs"` the queries are the input adapter's output at each position (token + position
    embedding, plus the context convolution of `config.context_kernel_size`), added back after the
    cross-attention, so a masked token is predicted from its neighbours and the latents. `logits` is
    `(B, N, vocab_size)`. In
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
        self.queries_from_inputs = config.mlm_decoder_queries == "inputs"
        # DeepMind's position queries carry no content, so their decoder has no query residual; queries built
        # from the inputs do, and keep it (each prediction starts from its own position's features).
        self.decoder = PerceiverDecoder(
            config,
            TextOutputAdapter(config.vocab_size, config.max_position_embeddings, config.d_model),
            use_query_residual=self.queries_from_inputs,
            learned_queries=not self.queries_from_inputs,
        )
        self.post_init()

    def resize_position_embeddings(self, new_num_position_embeddings: int) -> None:
        """Resize the input positions (see the base class) and the decoder's per-position output queries
        alike: the first `min(old, new)` queries keep their trained values, added ones are new."""
        super().resize_position_embeddings(new_num_position_embeddings)
        if self.queries_from_inputs:  # the queries are the (resized) input positions' features
            self.decoder.output_adapter.output_shape = (new_num_position_embeddings, self.config.d_model)
            return
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
    ) -> PerceiverMaskedLMOutput | tuple:
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
        if self.queries_from_inputs:
            # The adapted inputs serve twice: as the encoder's inputs and as the decoder's queries.
            adapted, attention_mask = self.perceiver.input_adapter(input_ids, attention_mask)  # (B, N, E)
            encoded = self.perceiver.encoder(
                adapted,
                attention_mask=attention_mask,
                output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
                output_hidden_states=(
                    self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
                ),
                inputs_are_adapted=True,
            )
            queries = adapted  # (B, N, E)
        else:
            encoded = self.perceiver(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            queries = self.decoder.output_query[: input_ids.shape[1]]  # (N, E)

        decode_labelled_only = labels is not None and self.training and self.config.decode_masked_only
        if decode_labelled_only:
            # Move the labelled positions to the front of each row (stable sort keeps their order) and
            # decode the first K of them, K = most labels in a row. Rows with fewer labels decode a few
            # unlabelled positions whose target is -100, so the loss is exactly the full decoder's.
            is_labelled = labels != -100  # (B, N)
            num_decoded = max(int(is_labelled.sum(dim=1).max()), 1)
            positions = torch.argsort((~is_labelled).to(torch.int8), dim=1, stable=True)[:, :num_decoded]  # (B, K)
            if queries.ndim == 2:
                queries = queries[positions]  # (B, K, E)
            else:
                queries = queries.gather(1, positions.unsqueeze(-1).expand(-1, -1, queries.shape[-1]))  # (B, K, E)
            labels = labels.gather(1, positions)  # (B, K)

        decoded = self.decoder(encoded.last_hidden_state, output_query=queries, output_attentions=output_attentions)
        logits = decoded.logits  # (B, N or K, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        output = PerceiverMaskedLMOutput(
            loss=loss,
            logits=None if decode_labelled_only else logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            cross_attentions=_cross_attentions(encoded, decoded),
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


class MeanPoolingClassifier(nn.Module):
    """lucidrains' Perceiver classifier (`config.pooling="mean"`): the mean of the latents `(B, L, D)`, then LayerNorm
    and a linear layer -> logits `(B, num_labels)`. Called like the classification decoder it replaces (it has no
    attention weights to return)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_latents, eps=config.layer_norm_eps)
        self.linear = nn.Linear(config.d_latents, config.num_labels)

    def forward(self, latents: torch.Tensor, output_attentions: bool = False) -> PerceiverDecoderOutput:
        return PerceiverDecoderOutput(logits=self.linear(self.norm(latents.mean(dim=1))))


class _PerceiverClassificationModel(PerceiverPreTrainedModel):
    """Encoder, then learned queries cross-attending to the latents, then a classification adapter; or, with
    `config.pooling="mean"`, the mean of the latents into a `MeanPoolingClassifier` (lucidrains' Perceiver).

    The decoder is named `classification_decoder` (not `decoder`) so that loading a masked-LM
    checkpoint keeps the adapter and encoder and reports the new decoder as newly initialised.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        if config.pooling not in ("decoder", "mean"):
            raise ValueError(
                f"{type(self).__name__} takes pooling 'decoder' or 'mean', got {config.pooling!r} "
                "('latents' and 'none' are PerceiverForMultimodalClassification's)"
            )
        self.num_labels = config.num_labels
        self.perceiver = PerceiverModel(config)
        if config.pooling == "mean":
            self.mean_pooling_classifier = MeanPoolingClassifier(config)
        else:
            self.classification_decoder = PerceiverDecoder(
                config,
                ClassificationOutputAdapter(
                    config.num_labels,
                    num_outputs=config.num_output_queries,
                    num_output_channels=config.d_output_queries or config.d_latents,
                ),
                use_query_residual=True,
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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> PerceiverClassifierOutput | tuple:
        """Classify what this head's processor returns: its `main_input_name` is the input it takes.

        Args:
            input_ids: `(B, N)` token ids (text); positions beyond `max_position_embeddings` are dropped.
            attention_mask: `(B, N)` (text) or `(B, T)` (audio samples), 1 for real positions, 0 for padding.
            pixel_values: `(B, C, H, W)` or `(B, H, W, C)` images.
            input_values: `(B, T)` mono or `(B, T, A)` waveforms, `T <= config.max_audio_samples`.
            inputs: the raw inputs of any other input adapter (a head for a new modality sets
                `main_input_name = "inputs"`).
            labels: `(B,)` class ids (single-label), `(B, num_labels)` multi-hot floats (multi-label), or
                `(B,)` / `(B, num_labels)` floats (regression).
            interpolate_pos_encoding: images: resize learned positions to images of another size than configured.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        given = {"input_ids": input_ids, "pixel_values": pixel_values, "input_values": input_values, "inputs": inputs}
        if given[self.main_input_name] is None:
            raise ValueError(f"{self.main_input_name} is required")
        others = sorted(name for name, value in given.items() if value is not None and name != self.main_input_name)
        if others:
            raise ValueError(f"{type(self).__name__} takes {self.main_input_name}, not {others}")
        if input_ids is not None:
            given["input_ids"], attention_mask = self._truncate(input_ids, attention_mask)
        encoded = self.perceiver(
            **{self.main_input_name: given[self.main_input_name]},
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return self._classify(encoded, labels, output_attentions, return_dict)

    def _truncate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (and their mask) cut to the model's positions, with a warning."""
        max_len = self.config.max_position_embeddings
        if input_ids.ndim != 2 or input_ids.shape[1] <= max_len:
            return input_ids, attention_mask
        logger.warning_once(
            f"input_ids of length {input_ids.shape[1]} is cut to the model's {max_len} positions "
            "(max_position_embeddings); tokenize with truncation=True to truncate before the model"
        )
        return input_ids[:, :max_len], None if attention_mask is None else attention_mask[:, :max_len]

    def _classify(
        self,
        encoded: BaseModelOutputWithCrossAttentions,
        labels: torch.Tensor | None,
        output_attentions: bool | None,
        return_dict: bool,
    ) -> PerceiverClassifierOutput | tuple:
        classifier = self.mean_pooling_classifier if self.config.pooling == "mean" else self.classification_decoder
        decoded = classifier(encoded.last_hidden_state, output_attentions=bool(output_attentions))
        logits = decoded.logits
        if logits.ndim == 3:  # several output queries: average their logits
            logits = logits.mean(dim=1)  # (B, K)
        loss = None if labels is None else _classification_loss(self.config, logits, labels)
        output = PerceiverClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            cross_attentions=_cross_attentions(encoded, decoded),
        )
        return output if return_dict else output.to_tuple()


class PerceiverForSequenceClassification(_PerceiverClassificationModel):
    """Perceiver IO text classifier: `input_ids` `(B, N)` -> `(B, num_labels)` logits, loss from `labels`
    (single-label, multi-label or regression by `config.problem_type`).

    Inputs longer than `config.max_position_embeddings` are cut to their first `max_position_embeddings` tokens
    (with a warning) instead of failing, so that `pipeline("text-classification")` classifies long reviews with no
    extra argument. Tokenizing with `truncation=True` (the tokenizer's `model_max_length`) truncates before the
    model and keeps `[SEP]`.
    """


class PerceiverForImageClassification(_PerceiverClassificationModel):
    """Perceiver IO image classifier: `pixel_values` `(B, C, H, W)` or `(B, H, W, C)` -> `(B, num_labels)`;
    `interpolate_pos_encoding=True` resizes learned positions to images of another size than configured."""

    main_input_name = "pixel_values"
