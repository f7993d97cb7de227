"""Configuration of Perceiver IO models.

One flat, validated `PerceiverConfig` describes a whole model: the input adapter (chosen by name),
the encoder (latent array, cross-attention and self-attention layers), the decoder and the task
head. Everything that shapes the model is a plain JSON value in `config.json`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from .adapters_multimodal import validate_modalities

__all__ = ["PerceiverConfig", "INPUT_ADAPTERS", "HIDDEN_ACTIVATIONS", "ATTN_IMPLEMENTATIONS", "POOLINGS"]

INPUT_ADAPTERS = ("text", "image", "audio", "multimodal")
HIDDEN_ACTIVATIONS = ("gelu", "geglu")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
IMAGE_POSITION_ENCODINGS = ("fourier", "learned")
IMAGE_PREPROCESSINGS = ("pixels", "conv", "patches")
IMAGE_CONV_PADDINGS = ("same", "transformers")
# transformers' loss choices for classification heads (None: inferred from num_labels and the labels' dtype).
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
AUDIO_PREPROCESSINGS = ("samples", "spectrogram")
# Multimodal classification: how the latents become the task heads' inputs (see PerceiverForMultimodalClassification).
POOLINGS = ("decoder", "mean", "latents", "none")


class PerceiverConfig(PretrainedConfig):
    r"""Configuration of a Perceiver IO model (`model_type="perceiver_io"`).

    The encoder cross-attends from a learned latent array (`num_latents` x `d_latents`) to the adapted
    inputs, then runs `num_self_attention_blocks` blocks of `num_self_attention_layers_per_block`
    self-attention layers. A cross-attention layer precedes each of the first
    `num_cross_attention_layers` blocks. Weight sharing follows the Perceiver papers:

    - DeepMind's Perceiver IO: one cross-attention layer, then the same self-attention block repeated
      (`num_cross_attention_layers=1`, `first_self_attention_block_shared=True`).
    - The original Perceiver: several cross-attention layers, each followed by a block; layer 1 has its
      own weights and layers 2.. share one set (`num_cross_attention_layers=num_self_attention_blocks`,
      `first_cross_attention_layer_shared=False`, `first_self_attention_block_shared=False`).

    Args:
        input_adapter (`str`, *optional*, defaults to `"text"`):
            Which input adapter maps raw inputs to `(batch, positions, channels)`: `"text"`, `"image"`,
            `"audio"` (raw waveforms) or `"multimodal"` (a dict of the modalities declared in `modalities`).
        vocab_size (`int`, *optional*, defaults to 10000):
            Text: size of the token vocabulary.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Text: number of learned input positions (and masked-LM output queries).
        d_model (`int`, *optional*, defaults to 256):
            Text: width of the token and position embeddings (the encoder's input channels).
        image_size (`list[int]`, *optional*, defaults to `[224, 224]`):
            Image: configured `(height, width)`. Fourier-feature models also accept other sizes.
        num_channels (`int`, *optional*, defaults to 3):
            Image: number of pixel channels.
        num_frequency_bands (`int`, *optional*, defaults to 64):
            Image and audio: Fourier frequency bands per spatial (or time) axis.
        max_frequency (`float`, *optional*):
            Image and audio: highest Fourier frequency (Nyquist frequency of the configured size, or of the
            `max_audio_samples` grid, when `None`).
        image_position_encoding (`str`, *optional*, defaults to `"fourier"`):
            Image: `"fourier"` features or `"learned"` position embeddings.
        image_preprocessing (`str`, *optional*, defaults to `"pixels"`):
            Image: `"pixels"`, `"conv"` (conv + max-pool) or `"patches"`.
        spatial_downsample (`int`, *optional*):
            Image: downsampling factor of the preprocessing: every n-th row and column ("pixels"), the patch
            size ("patches"), or a power of 4 ("conv": 4x per conv + max-pool layer). `None`: 1 for "pixels",
            4 for "patches" and "conv".
        image_projection_channels (`int`, *optional*):
            Image: "pixels" / "patches": width of a linear projection of each position's features (`None`:
            none; "pixels" with a projection is DeepMind's "conv1x1"). "conv": the convolution's output
            channels (`None`: 64).
        image_position_channels (`int`, *optional*):
            Image, `image_position_encoding="learned"`: width of the learned position embeddings (`None`: 258).
        image_position_projection_channels (`int`, *optional*):
            Image: width of a linear projection of the position features before they are concatenated to the
            image features (DeepMind's `project_pos_dim`; `None`: no projection).
        image_conv_padding (`str`, *optional*, defaults to `"same"`):
            Image, "conv": border padding of the conv + max-pool stem: `"same"` (TensorFlow "SAME" padding, as
            DeepMind's; 224 -> 56 pixels) or `"transformers"` (as transformers' port of the stem, which pads the
            convolution by 3 pixels on every side and not the max-pool; 224 -> 55). Checkpoints converted from
            transformers use `"transformers"`.
        max_audio_samples (`int`, *optional*, defaults to 16000):
            Audio: longest waveform accepted, in samples. Positions are encoded on this fixed grid, so a clip's
            features do not depend on how much padding its batch has.
        audio_patch_size (`int`, *optional*, defaults to 1):
            Audio: consecutive samples grouped into one input position (1: one position per sample).
        num_audio_channels (`int`, *optional*, defaults to 1):
            Audio: channels of the waveform (1 for mono).
        audio_projection_channels (`int`, *optional*):
            Audio: width of a linear projection of each patch's features (`None`: no projection).
        audio_preprocessing (`str`, *optional*, defaults to `"samples"`):
            Audio: features of each patch: `"samples"` (the raw samples) or `"spectrogram"` (its log power
            spectrum, `audio_patch_size // 2 + 1` bins per channel).
        sampling_rate (`int`, *optional*, defaults to 16000):
            Audio: sampling rate the model expects (the feature extractor checks it).
        modalities (`list[dict]`, *optional*):
            Multimodal: the modalities, each a plain dict with `name`, `channels`, `num_axes`, `num_freq_bands`,
            `max_freq` and optionally `vocab_size` (token ids embedded to `channels`), `split_across_layers`,
            `max_length` and `patch_size`; see `perceiver_hf.adapters_multimodal.ModalitySpec`.
        pooling (`str`, *optional*, defaults to `"decoder"`):
            Multimodal classification: how latents feed the task heads: `"decoder"` (learned queries cross-attend
            to the latents), `"mean"` (mean over latents), `"latents"` (latent `i` feeds task head `i`) or
            `"none"` (no head: the latents are returned).
        task_num_labels (`list[int]`, *optional*):
            Multimodal classification: classes of each task head (several tasks); `None`: one task of
            `num_labels` classes.
        num_latents (`int`, *optional*, defaults to 256):
            Number of latent vectors.
        d_latents (`int`, *optional*, defaults to 512):
            Width of the latent vectors.
        num_cross_attention_layers (`int`, *optional*, defaults to 1):
            Number of encoder cross-attention layers (inputs -> latents).
        num_self_attention_blocks (`int`, *optional*, defaults to 1):
            Number of self-attention blocks applied to the latents.
        num_self_attention_layers_per_block (`int`, *optional*, defaults to 6):
            Self-attention layers in each block.
        first_cross_attention_layer_shared (`bool`, *optional*, defaults to `False`):
            Whether cross-attention layer 1 shares its weights with layers 2.. .
        first_self_attention_block_shared (`bool`, *optional*, defaults to `True`):
            Whether self-attention block 1 shares its weights with blocks 2.. .
        num_cross_attention_heads (`int`, *optional*, defaults to 1):
            Heads of the encoder cross-attention.
        num_self_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the latent self-attention.
        cross_attention_qk_channels / cross_attention_v_channels (`int`, *optional*):
            Query/key and value widths of the encoder cross-attention (`d_latents` when `None`; the value width
            defaults to the query/key width).
        self_attention_qk_channels / self_attention_v_channels (`int`, *optional*):
            Query/key and value widths of the latent self-attention (`d_latents` when `None`; the value width
            defaults to the query/key width).
        cross_attention_widening_factor / self_attention_widening_factor (`int`, *optional*, defaults to 1):
            MLP hidden width as a multiple of the layer's width.
        use_query_residual (`bool`, *optional*, defaults to `True`):
            Whether the encoder cross-attention adds its query (the latents) back to its output.
        num_decoder_heads (`int`, *optional*, defaults to 1):
            Heads of the decoder cross-attention (output queries -> latents).
        decoder_qk_channels / decoder_v_channels (`int`, *optional*):
            Query/key and value widths of the decoder cross-attention (query width when `None`).
        decoder_widening_factor (`int`, *optional*, defaults to 1):
            MLP widening factor of the decoder cross-attention layer.
        decoder_use_query_residual (`bool`, *optional*):
            Whether the decoder adds its queries to its output; `None` lets each head choose (masked LM:
            no, as DeepMind's; classification: yes).
        num_output_queries (`int`, *optional*, defaults to 1):
            Classification: number of learned decoder queries.
        d_output_queries (`int`, *optional*):
            Classification: width of the learned decoder queries (`d_latents` when `None`).
        decode_masked_only (`bool`, *optional*, defaults to `True`):
            Masked LM: in training mode with `labels`, decode only the labelled positions (same loss,
            far less compute at 15% masking); `logits` is then `None`.
        freeze_encoder (`bool`, *optional*, defaults to `False`):
            Classification: build the model with the input adapter and encoder frozen (no gradients).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation: `"gelu"` or `"geglu"`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the residual branches (attention output and MLP output).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            LayerNorm epsilon.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Masked LM: project to the vocabulary with the input token embedding matrix.
        pad_token_id (`int`, *optional*):
            Text: id of the padding token.

    Example:

    ```python
    >>> from perceiver_hf import PerceiverConfig, PerceiverForMaskedLM
    >>> config = PerceiverConfig(vocab_size=10000, d_model=128, num_latents=64, d_latents=128)
    >>> model = PerceiverForMaskedLM(config)
    ```
    """

    model_type = "perceiver_io"

    def __init__(
        self,
        input_adapter: str = "text",
        # text
        vocab_size: int = 10000,
        max_position_embeddings: int = 512,
        d_model: int = 256,
        # image
        image_size: list[int] | tuple[int, int] = (224, 224),
        num_channels: int = 3,
        num_frequency_bands: int = 64,
        max_frequency: float | None = None,
        image_position_encoding: str = "fourier",
        image_preprocessing: str = "pixels",
        spatial_downsample: int | None = None,
        image_projection_channels: int | None = None,
        image_position_channels: int | None = None,
        image_position_projection_channels: int | None = None,
        image_conv_padding: str = "same",
        # audio
        max_audio_samples: int = 16000,
        audio_patch_size: int = 1,
        num_audio_channels: int = 1,
        audio_projection_channels: int | None = None,
        audio_preprocessing: str = "samples",
        sampling_rate: int = 16000,
        # multimodal
        modalities: list[dict[str, Any]] | None = None,
        pooling: str = "decoder",
        task_num_labels: list[int] | None = None,
        # encoder
        num_latents: int = 256,
        d_latents: int = 512,
        num_cross_attention_layers: int = 1,
        num_self_attention_blocks: int = 1,
        num_self_attention_layers_per_block: int = 6,
        first_cross_attention_layer_shared: bool = False,
        first_self_attention_block_shared: bool = True,
        num_cross_attention_heads: int = 1,
        num_self_attention_heads: int = 8,
        cross_attention_qk_channels: int | None = None,
        cross_attention_v_channels: int | None = None,
        self_attention_qk_channels: int | None = None,
        self_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        self_attention_widening_factor: int = 1,
        use_query_residual: bool = True,
        # decoder
        num_decoder_heads: int = 1,
        decoder_qk_channels: int | None = None,
        decoder_v_channels: int | None = None,
        decoder_widening_factor: int = 1,
        decoder_use_query_residual: bool | None = None,
        num_output_queries: int = 1,
        d_output_queries: int | None = None,
        decode_masked_only: bool = True,
        freeze_encoder: bool = False,
        # shared
        hidden_act: str = "gelu",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.input_adapter = input_adapter
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.image_size = list(image_size)
        self.num_channels = num_channels
        self.num_frequency_bands = num_frequency_bands
        self.max_frequency = max_frequency
        self.image_position_encoding = image_position_encoding
        self.image_preprocessing = image_preprocessing
        self.spatial_downsample = spatial_downsample
        self.image_projection_channels = image_projection_channels
        self.image_position_channels = image_position_channels
        self.image_position_projection_channels = image_position_projection_channels
        self.image_conv_padding = image_conv_padding
        self.max_audio_samples = max_audio_samples
        self.audio_patch_size = audio_patch_size
        self.num_audio_channels = num_audio_channels
        self.audio_projection_channels = audio_projection_channels
        self.audio_preprocessing = audio_preprocessing
        self.sampling_rate = sampling_rate
        # Plain dicts (not objects) keep config.json plain JSON.
        self.modalities = None if modalities is None else [dict(m) for m in modalities]
        self.pooling = pooling
        self.task_num_labels = None if task_num_labels is None else list(task_num_labels)
        self.num_latents = num_latents
        self.d_latents = d_latents
        self.num_cross_attention_layers = num_cross_attention_layers
        self.num_self_attention_blocks = num_self_attention_blocks
        self.num_self_attention_layers_per_block = num_self_attention_layers_per_block
        self.first_cross_attention_layer_shared = first_cross_attention_layer_shared
        self.first_self_attention_block_shared = first_self_attention_block_shared
        self.num_cross_attention_heads = num_cross_attention_heads
        self.num_self_attention_heads = num_self_attention_heads
        self.cross_attention_qk_channels = cross_attention_qk_channels
        self.cross_attention_v_channels = cross_attention_v_channels
        self.self_attention_qk_channels = self_attention_qk_channels
        self.self_attention_v_channels = self_attention_v_channels
        self.cross_attention_widening_factor = cross_attention_widening_factor
        self.self_attention_widening_factor = self_attention_widening_factor
        self.use_query_residual = use_query_residual
        self.num_decoder_heads = num_decoder_heads
        self.decoder_qk_channels = decoder_qk_channels
        self.decoder_v_channels = decoder_v_channels
        self.decoder_widening_factor = decoder_widening_factor
        self.decoder_use_query_residual = decoder_use_query_residual
        self.num_output_queries = num_output_queries
        self.d_output_queries = d_output_queries
        self.decode_masked_only = decode_masked_only
        self.freeze_encoder = freeze_encoder
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_perceiver()

    def validate_perceiver(self) -> None:
        """Raise a `ValueError` naming the setting, its value and what was expected, for the first
        inconsistent or out-of-range setting."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} ({value!r}) must be one of {list(allowed)}")

        def positive_int(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")

        def probability(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} ({value!r}) must be a float in [0, 1)")

        def divisible(channels_name: str, heads_name: str, *default_names: str) -> None:
            channels = getattr(self, channels_name)
            for default_name in default_names:  # the first of the defaults that is set
                if channels is None:
                    channels_name, channels = default_name, getattr(self, default_name)
            heads = getattr(self, heads_name)
            if channels % heads != 0:
                raise ValueError(f"{channels_name} ({channels}) must be divisible by {heads_name} ({heads})")

        choice("input_adapter", INPUT_ADAPTERS)
        choice("hidden_act", HIDDEN_ACTIVATIONS)
        choice("image_position_encoding", IMAGE_POSITION_ENCODINGS)
        choice("image_preprocessing", IMAGE_PREPROCESSINGS)
        choice("image_conv_padding", IMAGE_CONV_PADDINGS)
        choice("pooling", POOLINGS)
        choice("audio_preprocessing", AUDIO_PREPROCESSINGS)
        for name in (
            "vocab_size", "max_position_embeddings", "d_model", "num_channels", "num_frequency_bands",
            "num_latents", "d_latents", "num_cross_attention_layers", "num_self_attention_blocks",
            "num_self_attention_layers_per_block", "num_cross_attention_heads", "num_self_attention_heads",
            "cross_attention_widening_factor", "self_attention_widening_factor", "num_decoder_heads",
            "decoder_widening_factor", "num_output_queries", "max_audio_samples", "audio_patch_size",
            "num_audio_channels", "sampling_rate",
        ):  # fmt: skip
            positive_int(name)
        for name in (
            "cross_attention_qk_channels", "cross_attention_v_channels", "self_attention_qk_channels",
            "self_attention_v_channels", "decoder_qk_channels", "decoder_v_channels", "d_output_queries",
            "spatial_downsample", "image_projection_channels", "image_position_channels",
            "image_position_projection_channels", "audio_projection_channels",
        ):  # fmt: skip
            positive_int(name, optional=True)
        probability("dropout")
        probability("attention_dropout")
        if len(self.image_size) != 2 or any(not isinstance(s, int) or s < 1 for s in self.image_size):
            raise ValueError(f"image_size ({self.image_size!r}) must be two positive integers (height, width)")
        if self.max_frequency is not None and not self.max_frequency > 0:
            raise ValueError(f"max_frequency ({self.max_frequency!r}) must be positive or None")
        if self.image_preprocessing == "conv" and self.spatial_downsample is not None:
            downsample = self.spatial_downsample
            if downsample < 4 or 4 ** round(math.log(downsample, 4)) != downsample:
                raise ValueError(
                    f"spatial_downsample ({downsample}) must be a power of 4 (4, 16, ...) for "
                    "image_preprocessing='conv'"
                )
        if self.image_position_channels is not None and self.image_position_encoding != "learned":
            raise ValueError(
                f"image_position_channels ({self.image_position_channels}) sets the width of learned position "
                f"embeddings: it needs image_position_encoding='learned', not {self.image_position_encoding!r} "
                "(Fourier features have 2 * (2 * num_frequency_bands + 1) channels)"
            )
        if self.image_preprocessing == "patches":
            downsample = self.spatial_downsample or 4
            if any(size % downsample for size in self.image_size):
                raise ValueError(
                    f"image_size ({self.image_size}) must be divisible by spatial_downsample ({downsample}) for "
                    "image_preprocessing='patches'"
                )
        if self.num_cross_attention_layers > self.num_self_attention_blocks:
            raise ValueError(
                f"num_cross_attention_layers ({self.num_cross_attention_layers}) must not exceed "
                f"num_self_attention_blocks ({self.num_self_attention_blocks}): each cross-attention layer "
                "is followed by a self-attention block"
            )
        divisible("cross_attention_qk_channels", "num_cross_attention_heads", "d_latents")
        # The value width defaults to the query-key width, as in PerceiverAttention and DeepMind's Perceiver IO.
        divisible("cross_attention_v_channels", "num_cross_attention_heads", "cross_attention_qk_channels", "d_latents")
        divisible("self_attention_qk_channels", "num_self_attention_heads", "d_latents")
        divisible("self_attention_v_channels", "num_self_attention_heads", "self_attention_qk_channels", "d_latents")
        # The decoder's default width depends on the head (text: d_model, classification: d_output_queries).
        for name in ("decoder_qk_channels", "decoder_v_channels"):
            if getattr(self, name) is not None:
                divisible(name, "num_decoder_heads", name)
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range ({self.initializer_range!r}) must be positive")
        if (
            isinstance(self.layer_norm_eps, bool)
            or not isinstance(self.layer_norm_eps, (int, float))
            or not (self.layer_norm_eps > 0)
        ):
            raise ValueError(f"layer_norm_eps ({self.layer_norm_eps!r}) must be a positive number")
        # A truthy string such as "no" would silently switch a flag on.
        for name in (
            "use_query_residual", "first_cross_attention_layer_shared", "first_self_attention_block_shared",
            "decode_masked_only", "freeze_encoder", "tie_word_embeddings",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be True or False")
        if self.decoder_use_query_residual is not None and not isinstance(self.decoder_use_query_residual, bool):
            raise ValueError(
                f"decoder_use_query_residual ({self.decoder_use_query_residual!r}) must be True, False or None"
            )
        if self.num_labels < 1:
            raise ValueError(f"num_labels ({self.num_labels}) must be a positive integer")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type ({self.problem_type!r}) must be one of {list(PROBLEM_TYPES)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")
        if self.audio_patch_size > self.max_audio_samples:
            raise ValueError(
                f"audio_patch_size ({self.audio_patch_size}) must not exceed max_audio_samples "
                f"({self.max_audio_samples})"
            )
        if self.input_adapter == "multimodal" and not self.modalities:
            raise ValueError(f"input_adapter='multimodal' needs a non-empty modalities list, got {self.modalities!r}")
        if self.modalities is not None:
            # Checks every entry (names, sizes, text options) and that split text fits the cross-attention layers.
            validate_modalities(self.modalities, num_cross_attention_layers=self.num_cross_attention_layers)
        if self.task_num_labels is not None:
            if (
                not isinstance(self.task_num_labels, list)
                or not self.task_num_labels
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.task_num_labels)
            ):
                raise ValueError(
                    f"task_num_labels ({self.task_num_labels!r}) must be a non-empty list of positive integers"
                )
            if self.pooling == "latents" and len(self.task_num_labels) > self.num_latents:
                raise ValueError(
                    f"pooling='latents' feeds one latent per task: {len(self.task_num_labels)} tasks "
                    f"(task_num_labels) need at most num_latents ({self.num_latents}) latents"
                )
