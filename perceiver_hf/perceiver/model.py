"""krasserm's `perceiver.model` (early layout, commit 1e7069c): `PerceiverEncoder`, `PerceiverDecoder`,
`PerceiverIO`, `PerceiverMLM` and `TextMasking`, as thin translators onto this package's core.

`PerceiverEncoder` and `PerceiverDecoder` turn krasserm's arguments into a `PerceiverConfig` and are the core's
encoder and decoder (subclasses: same modules, same state-dict layout). What krasserm's layers were, the config
says: `nn.MultiheadAttention` attention (query/key/value width = the query width, biases on every projection,
dropout on the attention weights), a widening-factor-1 GELU MLP, `dropout` on both residual branches, and his
`num_layers` weight sharing (layer 1 its own cross-attention and self-attention block, layers 2.. one shared
set). The differences from his code are the results' types only where he had none: nothing else.

Masks: `pad_mask` is krasserm's key padding mask, `(B, N)` booleans, True for padding (the core's
`attention_mask` is the opposite: 1 for positions to attend to). Encoders return the latents `(B, L, D)` and
decoders the output adapter's output, plain tensors, so `decoder(encoder(x, pad_mask))` chains as there.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..configuration_perceiver import PerceiverConfig
from ..modeling_perceiver import PerceiverDecoder as _CoreDecoder
from ..modeling_perceiver import PerceiverEncoder as _CoreEncoder
from .adapter import InputAdapter, OutputAdapter

__all__ = [
    "PerceiverEncoder",
    "PerceiverDecoder",
    "PerceiverIO",
    "PerceiverMLM",
    "TextMasking",
    "convert_original_state_dict",
]


def _config(latent_shape: tuple[int, int], dropout: float, num_input_channels: int, **settings) -> PerceiverConfig:
    """The config of krasserm's layers: his attention and MLP widths, biases, activation and dropout. His adapters
    are modules of their own, given to the encoder, so the config names none ("none": inputs of
    `num_input_channels`)."""
    num_latents, num_latent_channels = latent_shape
    return PerceiverConfig(
        input_adapter="none",
        input_adapter_config={"num_input_channels": num_input_channels},
        num_latents=num_latents,
        d_latents=num_latent_channels,
        hidden_act="gelu",
        qkv_bias=True,
        dropout=dropout,
        attention_dropout=dropout,
        **settings,
    )


def _init_like_krasserm(parameter: nn.Parameter) -> None:
    with torch.no_grad():
        parameter.normal_(0.0, 0.02).clamp_(-2.0, 2.0)


def _attention_mask(pad_mask: torch.Tensor | None) -> torch.Tensor | None:
    """krasserm's `pad_mask` (True = padding) as the core's `attention_mask` (True = attend)."""
    if pad_mask is None:
        return None
    if pad_mask.dtype != torch.bool:
        raise ValueError(
            f"pad_mask must be a boolean tensor, True for padding (krasserm's key padding mask), got dtype "
            f"{pad_mask.dtype}; an integer attention mask (1 = attend) is the opposite convention"
        )
    return ~pad_mask


class PerceiverEncoder(_CoreEncoder):
    """Generic Perceiver IO encoder: `num_layers` x (cross-attention to the inputs, then a self-attention block).

    Args:
        input_adapter: transforms task-specific input to `(B, M, C_input)`.
        latent_shape: `(N, C_latent)` of the latent array.
        num_layers: encoder layers (a cross-attention layer and a self-attention block each); layer 1 has its own
            weights, layers 2.. share one set.
        num_cross_attention_heads / num_self_attention_heads: attention heads.
        num_self_attention_layers_per_block: self-attention layers per block.
        dropout: dropout on the attention weights and on the residual branches.
        activation_checkpoint: checkpoint the activations of every layer (training only).
    """

    def __init__(
        self,
        input_adapter: InputAdapter,
        latent_shape: tuple[int, int],
        num_layers: int,
        num_cross_attention_heads: int = 4,
        num_self_attention_heads: int = 4,
        num_self_attention_layers_per_block: int = 2,
        dropout: float = 0.0,
        activation_checkpoint: bool = False,
    ) -> None:
        config = _config(
            latent_shape,
            dropout,
            input_adapter.num_input_channels,
            num_cross_attention_layers=num_layers,
            num_self_attention_blocks=num_layers,
            num_self_attention_layers_per_block=num_self_attention_layers_per_block,
            first_cross_attention_layer_shared=False,
            first_self_attention_block_shared=False,
            num_cross_attention_heads=num_cross_attention_heads,
            num_self_attention_heads=num_self_attention_heads,
        )
        super().__init__(config, input_adapter)
        self.config = config
        self.num_layers = num_layers
        self.gradient_checkpointing = activation_checkpoint
        _init_like_krasserm(self.latent)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latents `(B, L, D)` of the inputs `x`; `pad_mask` `(B, M)` is True at padding positions."""
        return super().forward(x, attention_mask=_attention_mask(pad_mask)).last_hidden_state


class PerceiverDecoder(_CoreDecoder):
    """Generic Perceiver IO decoder: learned output queries cross-attend to the latents, then the output adapter.

    Args:
        output_adapter: maps `(B, K, C_output)` to the task's output; `output_shape` is `(K, C_output)`.
        latent_shape: `(N, C_latent)` of the encoder's latents (checked in `forward`).
        num_cross_attention_heads: attention heads.
        dropout: dropout on the attention weights and on the residual branches.
        activation_checkpoint: checkpoint the cross-attention layer's activations (training only).
    """

    def __init__(
        self,
        output_adapter: OutputAdapter,
        latent_shape: tuple[int, int],
        num_cross_attention_heads: int = 4,
        dropout: float = 0.0,
        activation_checkpoint: bool = False,
    ) -> None:
        # A decoder has no inputs of its own: its config's input width is the latents'.
        config = _config(latent_shape, dropout, latent_shape[1], num_decoder_heads=num_cross_attention_heads)
        super().__init__(config, output_adapter, use_query_residual=True)
        self.config = config
        self.latent_shape = tuple(latent_shape)
        self.gradient_checkpointing = activation_checkpoint
        _init_like_krasserm(self.output_query)

    def forward(self, x: torch.Tensor, output_query: torch.Tensor | None = None) -> torch.Tensor:
        """The output adapter's output for the latents `x` `(B, N, C_latent)` (`output_query`: other queries, e.g.
        the first positions' only)."""
        b, *d = x.shape
        if tuple(d) != self.latent_shape:
            raise ValueError(f"Latent shape {tuple(d)} different from required shape {self.latent_shape}")
        return super().forward(x, output_query=output_query).logits


class PerceiverIO(nn.Sequential):
    """`decoder(encoder(x, pad_mask))`: a Perceiver IO model composed from an encoder and a decoder."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder) -> None:
        super().__init__(encoder, decoder)

    @property
    def encoder(self) -> PerceiverEncoder:
        return self[0]

    @property
    def decoder(self) -> PerceiverDecoder:
        return self[1]

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.encoder(x, pad_mask))


class TextMasking(nn.Module):
    """BERT's masking (https://arxiv.org/abs/1810.04805): 15% of the non-special tokens are selected; of those 80%
    become `[MASK]`, 10% a random token, 10% stay. Modifies `x` in place, as krasserm's does.

    Returns `(masked ids, labels)` with labels -100 except at the selected positions.
    """

    def __init__(
        self,
        vocab_size: int,
        unk_token_id: int = 1,
        mask_token_id: int = 2,
        num_special_tokens: int = 3,
        mask_p: float = 0.15,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.unk_token_id = unk_token_id
        self.mask_token_id = mask_token_id
        self.num_special_tokens = num_special_tokens
        self.mask_p = mask_p

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = x.clone()
        is_input = ~((x == self.unk_token_id) | pad_mask)  # special tokens (UNK, PAD) are never selected
        is_selected = (torch.rand_like(x, dtype=torch.float) < self.mask_p) & is_input
        is_masked = is_selected & (torch.rand_like(x, dtype=torch.float) < 0.9)
        # Of the 90% that are not left unchanged, 1/9 (10% of the selected) become a random token.
        is_random = is_masked & (torch.rand_like(x, dtype=torch.float) < 1 / 9)
        x[is_masked] = self.mask_token_id
        # The first non-special token id is num_special_tokens.
        x[is_random] = torch.randint(
            self.num_special_tokens, self.vocab_size, size=(int(is_random.sum()),), device=x.device
        )
        labels[~is_selected] = -100
        return x, labels


class PerceiverMLM(nn.Module):
    """Masked language model: `(logits (B, L, vocab_size), labels (B, L) or None)` of token ids `(B, L)`."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder, masking: TextMasking) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.masking = masking

    def forward(
        self, x_input: torch.Tensor, pad_mask: torch.Tensor | None = None, masking: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq_len = x_input.shape[1]
        if masking:
            x_masked, x_labels = self.masking(x_input, pad_mask)
        else:
            x_masked, x_labels = x_input, None
        x_latent = self.encoder(x_masked, pad_mask)
        # krasserm decodes every query and keeps the first `seq_len`; the queries are decoded independently, so
        # decoding only those is the same result for less work.
        x_logits = self.decoder(x_latent, output_query=self.decoder.output_query[:seq_len])
        return x_logits, x_labels


# krasserm's module paths -> the core's. His encoder layer is `Sequential(cross-attention layer, self-attention block)`
# with `layer_1` its own weights and `layer_n` the set that serves layers 2.. (the core's weight sets 0 and 1); each
# attention layer is `Sequential(Residual(attention), Residual(mlp))`, and his MLP `Sequential(LayerNorm, Linear,
# GELU, Linear)`.
_WEIGHT_SET = {"1": "0", "n": "1"}
_MLP_LAYERS = {"0": "norm", "1": "fc1", "3": "fc2"}
_ORIGINAL_KEY_RULES = [
    (r"layer_(1|n)\.0\.", lambda m: f"cross_attention.{_WEIGHT_SET[m[1]]}."),
    (r"layer_(1|n)\.1\.(\d+)\.", lambda m: f"self_attention.{_WEIGHT_SET[m[1]]}_{m[2]}."),
    (r"(^|\.)0\.module\.", r"\1"),  # Residual(attention): the layer itself
    (r"(^|\.)1\.module\.", r"\1mlp."),  # Residual(mlp)
    (r"mlp\.([013])\.", lambda m: f"mlp.{_MLP_LAYERS[m[1]]}."),
    (r"attention\.attention\.out_proj\.", "attention.o_proj."),
    (r"attention\.attention\.([qkv])_proj_weight$", r"attention.\1_proj.weight"),
    (r"(^|\.)output$", r"\1output_query"),
]


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of krasserm's original modules (`PerceiverIO`, `PerceiverMLM`, an encoder or a decoder) with
    the keys and tensors of this mirror's, so his trained weights load with `load_state_dict` and compute the same
    outputs. `nn.MultiheadAttention`'s packed `in_proj_weight` / `in_proj_bias` are split into the query, key and
    value projections."""
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _ORIGINAL_KEY_RULES:
            key = re.sub(pattern, replacement, key)
        packed = re.search(r"attention\.attention\.in_proj_(weight|bias)$", key)
        if packed:
            prefix = key[: packed.start()] + "attention."
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                converted[f"{prefix}{name}_proj.{packed.group(1)}"] = part.clone()
            continue
        converted[key] = tensor
    return converted
