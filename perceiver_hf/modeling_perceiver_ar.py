"""Perceiver AR (Hawthorne et al., 2022): long-context causal language modelling from the Perceiver IO blocks.

The last `c <= num_latents` tokens of the context are the latents. One `PerceiverCrossAttentionLayer` lets each latent
attend, causally, to every context position up to its own (the prefix and the latents before it); a stack of
`PerceiverSelfAttentionLayer`s then runs causal self-attention among the latents. Each latent predicts the next
token. The prefix costs one key/value projection per token, so the context can be long while the deep stack stays
`num_latents` wide. Positions enter through rotary embeddings only (relative, so a cached key keeps its meaning).

The attention itself is `PerceiverAttention` (transformers' attention interface: SDPA or eager): causality is an
explicit per-query mask built here, rotary embeddings and the key/value cache are `PerceiverAttention` arguments.

Generation (`generate()`, transformers' `GenerationMixin`) starts with `num_latents=1` latent at the end of the
prompt (the rest is prefix) and adds one latent per generated token until `config.num_latents` are in use. Layer 0 of
the `DynamicCache` holds the cross-attention keys/values of every position, layers 1.. the self-attention
keys/values of the latents. While the latents grow, a step computes the new token only. Once all latents are in use,
each new token moves the oldest latent into the prefix, which changes the self-attention context of every latent, so
the step keeps the cached cross-attention keys/values of the prefix and recomputes the latents: cached generation is
exactly uncached generation (a sliding window over stale latent states would not be).

Notation used in the shape comments:
    B  batch           n  new tokens of this call       T  context length (cached + new)
    c  latents in use  l  new latents of this call (min(c, n))   K  cross-attention keys
    D  hidden size     V  vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_perceiver_ar import PerceiverARConfig
from .modeling_perceiver import PerceiverCrossAttentionLayer, PerceiverSelfAttentionLayer, _CheckpointingMixin

__all__ = ["PerceiverARModel", "PerceiverARForCausalLM", "PerceiverARPreTrainedModel", "PerceiverARModelOutput"]


@dataclass
class PerceiverARModelOutput(ModelOutput):
    """Output of [`PerceiverARModel`].

    Args:
        last_hidden_state: `(B, l, D)`, the new latents after the final LayerNorm.
        past_key_values: the key/value cache (with `use_cache=True`).
        hidden_states: the latents after the cross-attention and after each self-attention layer.
        attentions: the self-attention weights `(B, H, l, c)` of each layer.
        cross_attentions: the cross-attention weights `(B, H, l, K)`.
    """

    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def rotary_cos_sin(
    position_ids: torch.Tensor, channels: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles of `position_ids` `(B, n)` for `channels` rotated channels: `(cos, sin)`, each `(B, n, channels)`.

    Computed on the fly (a few flops per position), so there is no buffer to restore after `from_pretrained`."""
    inv_freq = theta ** -(torch.arange(0, channels, 2, device=position_ids.device, dtype=torch.float32) / channels)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, n, channels / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, n, channels): the split-halves layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def causal_mask(query_index: torch.Tensor, key_index: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
    """Boolean `(B, q, k)` mask, True where query `i` may attend to key `j`: key position <= query position, the key
    is not padding. Each query may always attend to itself, so a padding query still has one key (its output is
    never used, but an empty softmax row would be NaN with SDPA).

    Args:
        query_index: `(q,)` sequence indices of the queries.
        key_index: `(B, k)` or `(k,)` sequence indices of the keys (per example after prefix dropout).
        key_keep: `(B, k)`, False at padding keys, or `None`.
    """
    if key_index.ndim == 1:
        key_index = key_index[None]
    keys, queries = key_index[:, None, :], query_index[None, :, None]  # (B|1, 1, k), (1, q, 1)
    mask = keys <= queries
    if key_keep is not None:
        mask = mask & key_keep.bool()[:, None, :]
    return mask | (keys == queries)  # (B, q, k)


class PerceiverARPreTrainedModel(PreTrainedModel):
    """Base class of the Perceiver AR models: weight initialisation, attention choice, checkpointing."""

    config_class = PerceiverARConfig
    config: PerceiverARConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["PerceiverCrossAttentionLayer", "PerceiverSelfAttentionLayer"]


class PerceiverARModel(_CheckpointingMixin, PerceiverARPreTrainedModel):
    """Perceiver AR without a head: token embedding, causal cross-attention into the latents, causal self-attention.

    Args:
        config: the model's [`PerceiverARConfig`].
    """

    def __init__(self, config: PerceiverARConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.cross_attention = PerceiverCrossAttentionLayer(
            config,
            config.num_cross_attention_heads,
            q_channels=d,
            kv_channels=d,
            qk_channels=config.cross_attention_qk_channels,
            v_channels=config.cross_attention_v_channels,
            widening_factor=config.cross_attention_widening_factor,
        )
        self.self_attention = nn.ModuleList(
            PerceiverSelfAttentionLayer(config, d, config.num_self_attention_heads)
            for _ in range(config.num_self_attention_layers)
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.cross_rotary_channels = config.rotary_channels(
            config.cross_attention_qk_channels, config.num_cross_attention_heads
        )
        self.self_rotary_channels = config.rotary_channels(
            config.self_attention_qk_channels, config.num_self_attention_heads
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rotary(self, position_ids: torch.Tensor, channels: int, dtype: torch.dtype):
        return rotary_cos_sin(position_ids, channels, self.config.rope_theta, dtype)

    def _check_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        num_latents: int | None,
    ) -> tuple[int, int, int]:
        """Validate the inputs; return (cached tokens, context length T, latents in use c)."""
        if input_ids is None or input_ids.ndim != 2:
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must have shape (batch, tokens), got {got}")
        b, n = input_ids.shape
        if n == 0:
            raise ValueError(
                f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)} (an empty prompt: "
                "start it with a token, e.g. the tokenizer's bos or cls token)"
            )
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        total = past + n
        limit = self.config.max_position_embeddings
        if total > limit:
            raise ValueError(
                f"input_ids: the context of {total} tokens ({past} cached + {n} new) is longer than "
                f"max_position_embeddings ({limit}); keep its last {limit} tokens at most"
            )
        cached_latents = past_key_values.get_seq_length(1) if past_key_values is not None and past else 0
        if num_latents is None:
            num_latents = min(self.config.num_latents, cached_latents + n)
        if (
            isinstance(num_latents, bool)
            or not isinstance(num_latents, int)
            or not 1 <= num_latents <= min(self.config.num_latents, total)
        ):
            raise ValueError(
                f"num_latents ({num_latents!r}) must be an integer in [1, {min(self.config.num_latents, total)}] "
                f"(at most config.num_latents ({self.config.num_latents}) and the context length ({total}))"
            )
        if past and cached_latents != max(0, num_latents - n):
            raise ValueError(
                f"past_key_values holds {cached_latents} latents, but {num_latents} latents with {n} new tokens need "
                f"the {max(0, num_latents - n)} latents before them: with every latent in use, a new token moves "
                "the oldest latent into the prefix; pass the last num_latents tokens with the cache's layer 0 "
                "cropped to the prefix and its other layers reset (generate() does this)"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (b, total):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = ({b}, {total}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None and tuple(position_ids.shape) != (b, n):
            raise ValueError(
                f"position_ids must have shape (batch, new tokens) = ({b}, {n}), got {tuple(position_ids.shape)}"
            )
        return past, total, num_latents

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        num_latents: int | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> PerceiverARModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, n)`):
                Token ids: the whole context, or the new tokens after those in `past_key_values`.
            attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*):
                1 for tokens, 0 for padding, over cached and new tokens. Left padding (as in batched generation)
                shifts the rotary positions so that each example's first token is at position 0.
            position_ids (`torch.LongTensor` of shape `(B, n)`, *optional*):
                Positions of the new tokens; from `attention_mask` (or counted from the cache) when `None`.
            past_key_values (`Cache`, *optional*):
                Key/value cache from an earlier call (layer 0: cross-attention, layers 1..: self-attention).
            use_cache (`bool`, *optional*):
                Return the key/value cache (a new `DynamicCache` unless one is passed).
            num_latents (`int`, *optional*):
                Latents in use `c`: the last `c` tokens of the context. Defaults to `min(config.num_latents, T)`
                without a cache, and to the cached latents plus the new tokens with one.
        """
        past, total, c = self._check_inputs(input_ids, attention_mask, position_ids, past_key_values, num_latents)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        b, n = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: each example's first token is at position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, n)
            else:
                position_ids = torch.arange(past, total, device=device).expand(b, n)

        x = self.embed_tokens(input_ids)  # (B, n, D)
        num_new_latents = min(c, n)  # l
        latent_index = torch.arange(total - num_new_latents, total, device=device)  # (l,)
        x_latent, latent_positions = x[:, -num_new_latents:], position_ids[:, -num_new_latents:]  # (B, l, D), (B, l)

        # Cross-attention keys/values: the new tokens (after the cached ones).
        x_kv, key_positions = x, position_ids  # (B, n, D), (B, n)
        key_index = torch.arange(past, total, device=device).expand(b, n)  # (B, n)
        key_keep = None if attention_mask is None else attention_mask[:, past:]
        prefix_len = n - num_new_latents
        if self.training and self.config.prefix_dropout > 0 and prefix_len > 0:
            if past_key_values is not None:
                raise ValueError("prefix dropout (config.prefix_dropout > 0) is for training without a cache")
            # Keep a random subset of the prefix (the same size for every example); the latents stay.
            num_kept = prefix_len - int(prefix_len * self.config.prefix_dropout)
            kept = torch.rand(b, prefix_len, device=device).topk(num_kept, dim=-1).indices.sort(dim=-1).values
            kept = torch.cat([kept, torch.arange(prefix_len, n, device=device).expand(b, -1)], dim=1)  # (B, K)
            x_kv = x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
            key_positions, key_index = position_ids.gather(1, kept), key_index.gather(1, kept)
            key_keep = None if key_keep is None else key_keep.gather(1, kept)
        if past:  # the cached keys come first
            key_index = torch.cat([torch.arange(past, device=device).expand(b, past), key_index], dim=1)
            if attention_mask is not None:
                key_keep = attention_mask
        cross_mask = causal_mask(latent_index, key_index, key_keep)  # (B, l, K)

        cross_rotary = (
            self._rotary(latent_positions, self.cross_rotary_channels, x.dtype),
            self._rotary(key_positions, self.cross_rotary_channels, x.dtype),
        )
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        h, cross_weights = self._run_layer(
            partial(
                self.cross_attention,
                attention_mask=cross_mask,
                output_attentions=output_attentions,
                position_embeddings=cross_rotary,
                past_key_values=past_key_values,
                layer_idx=0,
            ),
            x_latent,
            x_kv,
        )  # (B, l, D)

        # Self-attention among the latents: positions [T - c, T), the first c - l of them cached.
        self_key_index = torch.arange(total - c, total, device=device)  # (c,)
        self_keep = None if attention_mask is None else attention_mask[:, total - c :]
        self_mask = causal_mask(latent_index, self_key_index, self_keep)  # (B, l, c)
        self_rotary = self._rotary(latent_positions, self.self_rotary_channels, x.dtype)
        for i, layer in enumerate(self.self_attention):
            if output_hidden_states:
                all_hidden += (h,)
            h, weights = self._run_layer(
                partial(
                    layer,
                    output_attentions=output_attentions,
                    attention_mask=self_mask,
                    position_embeddings=(self_rotary, self_rotary),
                    past_key_values=past_key_values,
                    layer_idx=1 + i,
                ),
                h,
            )
            if output_attentions:
                all_attentions += (weights,)
        if output_hidden_states:
            all_hidden += (h,)
        return PerceiverARModelOutput(
            last_hidden_state=self.norm(h),
            past_key_values=past_key_values if use_cache or past else None,
            hidden_states=all_hidden,
            attentions=all_attentions,
            cross_attentions=(cross_weights,) if output_attentions else None,
        )


class PerceiverARForCausalLM(PerceiverARPreTrainedModel, GenerationMixin):
    """Perceiver AR with a language-modelling head: logits for the next token at each new latent.

    `labels` (the input ids, -100 where no loss is wanted) give the shifted causal loss over the latents: latent `t`
    predicts token `t + 1`. With `num_latents=c`, a sequence of `T` tokens trains on its last `c - 1` next-token
    predictions. Trainer and `generate()` work without glue.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The loss covers only the latents' predictions: Trainer's count of label tokens over the whole input would
    # mis-scale it, so the loss is a mean over this batch's predicted tokens.
    accepts_loss_kwargs = False

    def __init__(self, config: PerceiverARConfig) -> None:
        super().__init__(config)
        self.model = PerceiverARModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        num_latents: int | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(B, n)`, *optional*):
                Target ids aligned with `input_ids` (usually the input ids themselves, -100 at padding); the loss
                is the cross-entropy of each latent's prediction against the next label.

        The other arguments are [`PerceiverARModel.forward`]'s. `logits` are `(B, l, V)`, one row per new latent.
        """
        if labels is not None and (input_ids is None or labels.shape != input_ids.shape):
            got = tuple(labels.shape)
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            num_latents=num_latents,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # (B, l, V)
        loss = None
        if labels is not None:
            # Latent t predicts label t + 1; the last latent has no target.
            loss = ForCausalLMLoss(logits, labels[:, -logits.shape[1] :], self.config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # --- generation -------------------------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, *args, num_latents: int = 1, **kwargs):
        """`GenerationMixin.generate`, starting with `num_latents` latents at the end of the prompt (the rest is
        prefix); each generated token adds a latent until `config.num_latents` are in use.

        Raises a `ValueError` for an empty prompt or one longer than `config.max_position_embeddings`.
        """
        prompt = kwargs.get("input_ids", inputs)
        if isinstance(prompt, torch.Tensor) and prompt.ndim == 2:
            if prompt.shape[1] == 0:
                raise ValueError(
                    f"input_ids: the prompt is empty (shape {tuple(prompt.shape)}); generation needs at least one "
                    "token to start from, e.g. the tokenizer's bos or cls token"
                )
            if prompt.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"input_ids: the prompt has {prompt.shape[1]} tokens, more than max_position_embeddings "
                    f"({self.config.max_position_embeddings}); keep its last {self.config.max_position_embeddings} "
                    "tokens (with room for the new ones)"
                )
        if (
            isinstance(num_latents, bool)
            or not isinstance(num_latents, int)
            or not 1 <= num_latents <= (self.config.num_latents)
        ):
            raise ValueError(f"num_latents ({num_latents!r}) must be an integer in [1, {self.config.num_latents}]")
        return super().generate(inputs, *args, num_latents=num_latents, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        num_latents: int = 1,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """The inputs of the next forward pass: the whole sequence without a cache; with one, the new token, or,
        once every latent is in use, the last `num_latents` tokens with the cache cut back to the prefix."""
        total = input_ids.shape[1]
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids: generation reached {total} tokens, more than max_position_embeddings "
                f"({self.config.max_position_embeddings}); lower max_new_tokens or shorten the prompt"
            )
        c = min(num_latents, self.config.num_latents, total)
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        if past:
            new = total - past
            if past_key_values.get_seq_length(1) != c - new:
                # The oldest latent moved into the prefix: keep the prefix's cross-attention keys/values, recompute
                # the latents (their self-attention context changed).
                prefix_len = total - c
                past_key_values.layers[0].crop(prefix_len - past)
                for layer in past_key_values.layers[1:]:
                    layer.reset()
                input_ids = input_ids[:, prefix_len:]
            else:
                input_ids = input_ids[:, past:]
        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "num_latents": c,
        }
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # One more latent per generated token, up to config.num_latents.
        model_kwargs["num_latents"] = min(model_kwargs.get("num_latents", 1) + num_new_tokens, self.config.num_latents)
        return model_kwargs
