"""Configuration of Perceiver AR causal language models (Hawthorne et al., 2022, https://arxiv.org/abs/2202.07765).

A Perceiver AR model reads up to `max_position_embeddings` tokens: the last `num_latents` of them are the latents,
which cross-attend (causally) to the whole context and then run causal self-attention among themselves; the
earlier tokens (the prefix) are only keys and values of that one cross-attention. Context length and compute are
thus decoupled: the prefix costs one key/value projection per token, the deep stack runs on the latents only.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .adapters import _require_choice, _require_positive_int

__all__ = ["PerceiverARConfig"]


class PerceiverARConfig(PretrainedConfig):
    r"""Configuration of a [`PerceiverARForCausalLM`].

    The attention and MLP settings have the names and meanings of [`PerceiverConfig`]'s, as the model is built from
    the same blocks (`PerceiverCrossAttentionLayer`, `PerceiverSelfAttentionLayer`).

    Args:
        vocab_size (`int`, *optional*, defaults to 262):
            Size of the token vocabulary (262: transformers' byte-level `PerceiverTokenizer`).
        max_position_embeddings (`int`, *optional*, defaults to 4096):
            Longest context (prefix plus latents) the model reads; a longer input is an error.
        num_latents (`int`, *optional*, defaults to 512):
            Most latent positions: the last `num_latents` tokens of the context are the latents, each predicting
            the next token. Generation starts with fewer latents and adds one per generated token up to this.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the token embeddings and of the latents.
        num_self_attention_layers (`int`, *optional*, defaults to 6):
            Causal self-attention layers on the latents, after the cross-attention layer.
        num_cross_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the cross-attention from the latents to the whole context.
        num_self_attention_heads (`int`, *optional*, defaults to 8):
            Heads of each self-attention layer.
        cross_attention_qk_channels / cross_attention_v_channels (`int`, *optional*):
            Query-key and value widths of the cross-attention (`hidden_size` when `None`).
        self_attention_qk_channels / self_attention_v_channels (`int`, *optional*):
            Query-key and value widths of the self-attention (`hidden_size` when `None`).
        cross_attention_widening_factor (`int`, *optional*, defaults to 4):
            Hidden width of the cross-attention MLP as a multiple of `hidden_size`.
        self_attention_widening_factor (`int`, *optional*, defaults to 4):
            Hidden width of the self-attention MLPs as a multiple of `hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation, `"gelu"` or `"geglu"`.
        qkv_bias (`bool`, *optional*, defaults to `False`):
            Bias in the query, key and value projections (krasserm's Perceiver AR has none).
        prefix_dropout (`float`, *optional*, defaults to 0.5):
            Fraction of the prefix positions dropped at random from the cross-attention's keys and values in
            training (the paper's "cross-attention dropout"): regularisation, and a cheaper training step.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention and MLP outputs (`attention_output_dropout` / `mlp_output_dropout` override).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention weights.
        attention_output_dropout / mlp_output_dropout (`float`, *optional*):
            Dropout after attention / after the MLP (`dropout` when `None`).
        mlp_hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside the MLP, after the activation.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary position embeddings' frequencies.
        partial_rotary_factor (`float`, *optional*, defaults to 1.0):
            Fraction of each head's query-key channels that are rotated (rounded down to an even count).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the weight initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            The output projection shares the token embedding's weights.
    """

    model_type = "perceiver_ar"

    def __init__(
        self,
        vocab_size: int = 262,
        max_position_embeddings: int = 4096,
        num_latents: int = 512,
        hidden_size: int = 512,
        num_self_attention_layers: int = 6,
        num_cross_attention_heads: int = 8,
        num_self_attention_heads: int = 8,
        cross_attention_qk_channels: int | None = None,
        cross_attention_v_channels: int | None = None,
        self_attention_qk_channels: int | None = None,
        self_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 4,
        self_attention_widening_factor: int = 4,
        hidden_act: str = "gelu",
        qkv_bias: bool = False,
        prefix_dropout: float = 0.5,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention_output_dropout: float | None = None,
        mlp_hidden_dropout: float = 0.0,
        mlp_output_dropout: float | None = None,
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_latents = num_latents
        self.hidden_size = hidden_size
        self.num_self_attention_layers = num_self_attention_layers
        self.num_cross_attention_heads = num_cross_attention_heads
        self.num_self_attention_heads = num_self_attention_heads
        self.cross_attention_qk_channels = cross_attention_qk_channels
        self.cross_attention_v_channels = cross_attention_v_channels
        self.self_attention_qk_channels = self_attention_qk_channels
        self.self_attention_v_channels = self_attention_v_channels
        self.cross_attention_widening_factor = cross_attention_widening_factor
        self.self_attention_widening_factor = self_attention_widening_factor
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.prefix_dropout = prefix_dropout
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.attention_output_dropout = attention_output_dropout
        self.mlp_hidden_dropout = mlp_hidden_dropout
        self.mlp_output_dropout = mlp_output_dropout
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_perceiver_ar()

    @property
    def num_hidden_layers(self) -> int:
        """Attention layers, each with one key/value cache layer: the cross-attention, then the self-attention."""
        return 1 + self.num_self_attention_layers

    def rotary_channels(self, qk_channels: int | None, num_heads: int) -> int:
        """Rotated channels per head of an attention with `qk_channels` query-key channels over `num_heads`."""
        head_channels = (qk_channels or self.hidden_size) // num_heads
        return int(head_channels * self.partial_rotary_factor) // 2 * 2

    def validate_perceiver_ar(self) -> None:
        """Raise a `ValueError` naming the setting, its value and what was expected."""
        for name in (
            "vocab_size", "max_position_embeddings", "num_latents", "hidden_size", "num_self_attention_layers",
            "num_cross_attention_heads", "num_self_attention_heads", "cross_attention_widening_factor",
            "self_attention_widening_factor",
        ):  # fmt: skip
            _require_positive_int(name, getattr(self, name))
        for name in ("cross_attention_qk_channels", "cross_attention_v_channels"):
            _require_positive_int(name, getattr(self, name), optional=True)
        for name in ("self_attention_qk_channels", "self_attention_v_channels"):
            _require_positive_int(name, getattr(self, name), optional=True)
        if self.num_latents > self.max_position_embeddings:
            raise ValueError(
                f"num_latents ({self.num_latents}) must be at most max_position_embeddings "
                f"({self.max_position_embeddings}): the latents are the last positions of the context"
            )
        _require_choice("hidden_act", self.hidden_act, ["gelu", "geglu"])
        for prefix in ("cross", "self"):
            heads = getattr(self, f"num_{prefix}_attention_heads")
            for kind in ("qk", "v"):
                name = f"{prefix}_attention_{kind}_channels"
                channels = getattr(self, name) or self.hidden_size
                if channels % heads != 0:
                    raise ValueError(f"{name} ({channels}) must be divisible by num_{prefix}_attention_heads ({heads})")
            qk = getattr(self, f"{prefix}_attention_qk_channels")
            if self.rotary_channels(qk, heads) < 2:
                raise ValueError(
                    f"partial_rotary_factor ({self.partial_rotary_factor}) leaves fewer than 2 rotated channels per "
                    f"{prefix}-attention head ({(qk or self.hidden_size) // heads} channels); raise it or the width"
                )
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout ({self.prefix_dropout}) must be in [0, 1)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor ({self.partial_rotary_factor}) must be in (0, 1]")
