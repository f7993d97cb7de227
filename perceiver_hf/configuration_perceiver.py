"""Configuration of Perceiver IO models.

One validated `PerceiverConfig` describes a whole model: the input adapter (chosen by name, its own settings
grouped under `input_adapter_config`), the encoder (latent array, cross-attention and self-attention layers and
how they share weights), the decoder and the task head. `config.json` holds only what the model uses.

Configs saved by release 0.1.0 were flat (every adapter's fields at the top level); they are migrated on load.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

from .adapters import ImageInputAdapter, InputAdapter, TextInputAdapter, _require_choice, _require_positive_int
from .adapters_audio import AudioInputAdapter
from .adapters_flow import FlowInputAdapter
from .adapters_multimodal import MultimodalInputAdapter, validate_autoencoding_outputs

__all__ = [
    "PerceiverConfig",
    "INPUT_ADAPTERS",
    "input_adapter_settings",
    "HIDDEN_ACTIVATIONS",
    "ATTN_IMPLEMENTATIONS",
    "POOLINGS",
    "default_weight_sharing",
]

# `config.input_adapter` -> its adapter class: the one registry of input adapters. Each class declares its settings
# and their defaults (`config_settings`), checks them (`validate_config`) and builds itself (`from_config`); a new
# modality is a new class and one entry here. A config holds the settings of its adapter only, under
# `input_adapter_config`; `config.<setting>` reads and writes them there. "none" has no adapter: the encoder takes
# adapted inputs `(B, N, num_input_channels)` directly (`inputs_embeds`), as the older APIs' translators give it.
INPUT_ADAPTERS: dict[str, type[InputAdapter] | None] = {
    "none": None,
    "text": TextInputAdapter,
    "image": ImageInputAdapter,
    "audio": AudioInputAdapter,
    "multimodal": MultimodalInputAdapter,
    "flow": FlowInputAdapter,
}
_NO_ADAPTER_SETTINGS = {"num_input_channels": 256}


def input_adapter_settings(input_adapter: str) -> dict[str, Any]:
    """The settings of the input adapter named `input_adapter` and their defaults."""
    adapter_class = INPUT_ADAPTERS[input_adapter]
    return _NO_ADAPTER_SETTINGS if adapter_class is None else adapter_class.config_settings


def _all_adapter_settings() -> set[str]:
    return {name for input_adapter in INPUT_ADAPTERS for name in input_adapter_settings(input_adapter)}


HIDDEN_ACTIVATIONS = ("gelu", "geglu")
MLM_DECODER_QUERIES = ("positions", "inputs")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# transformers' loss choices for classification heads (None: inferred from num_labels and the labels' dtype).
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
# Classification: how the latents become the classifier's inputs ("latents" and "none": multimodal only).
POOLINGS = ("decoder", "mean", "latents", "none")


def default_weight_sharing(
    num_cross_attention_layers: int,
    num_self_attention_blocks: int,
    num_self_attention_layers_per_block: int,
    first_cross_attention_layer_shared: bool = False,
    first_self_attention_block_shared: bool = True,
) -> tuple[list[int], list[list[int]]]:
    """The weight-sharing pattern that the two `first_*_shared` flags describe, as explicit lists.

    Returns `(cross, self)`: `cross[i]` is the weight set of cross-attention layer `i`; `self[b][j]` that of layer
    `j` of self-attention block `b`. Layer/block 1 has its own weights (unless its flag shares them with the
    others); layers/blocks 2.. share one set.
    """
    cross = [0] + [0 if first_cross_attention_layer_shared else 1] * (num_cross_attention_layers - 1)
    per_block = num_self_attention_layers_per_block
    first = list(range(per_block))
    rest = first if first_self_attention_block_shared else list(range(per_block, 2 * per_block))
    return cross, [first] + [rest] * (num_self_attention_blocks - 1)


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
            `"audio"` (raw waveforms), `"flow"` (optical flow: frame pairs), `"multimodal"` (a dict of the
            modalities declared in `modalities`) or `"none"` (adapted inputs `(batch, positions,
            num_input_channels)` given as `inputs_embeds`).
        input_adapter_config (`dict`, *optional*):
            The adapter's settings, below (its class's `config_settings` are the defaults). They may also be given
            as keyword arguments, and read and write as attributes (`config.vocab_size`); another adapter's
            settings are an error. `config.json` holds them nested under this key.
        num_input_channels (`int`, *optional*, defaults to 256):
            "none": width of the adapted inputs.
        vocab_size (`int`, *optional*, defaults to 10000):
            Text: size of the token vocabulary.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Text: number of learned input positions (and masked-LM output queries).
        d_model (`int`, *optional*, defaults to 256):
            Text: width of the token and position embeddings (the encoder's input channels).
        context_kernel_size (`int`, *optional*):
            Text: odd width of a 1D convolution that adds to each position's embedding a function of its
            neighbours' (n-gram features for the cross-attention); `None`: none, as in DeepMind's models.
        image_size (`list[int]`, *optional*, defaults to `[224, 224]`):
            Image: configured `(height, width)`. Fourier-feature models also accept other sizes.
        num_channels (`int`, *optional*, defaults to 3):
            Image and flow: number of pixel channels.
        num_frequency_bands (`int`, *optional*, defaults to 64):
            Image, audio and flow: Fourier frequency bands per spatial (or time) axis.
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
        flow_image_size (`list[int]`, *optional*, defaults to `[368, 496]`):
            Flow: the training size `(height, width)` (DeepMind's: 368 x 496): the default resolution of the
            Fourier frequencies and the processor's tile size. Frame pairs of any size are accepted.
        flow_patch_size (`int`, *optional*, defaults to 3):
            Flow: side of the patch around each pixel whose values (of both frames) make the pixel's features.
        flow_max_frequencies (`list[float]`, *optional*):
            Flow: resolution per axis whose Nyquist frequency is the highest Fourier frequency (`None`:
            `flow_image_size`, as DeepMind's). `num_frequency_bands` (default 64) sets the bands per axis.
        flow_projection_channels (`int`, *optional*, defaults to 64):
            Flow: width of the linear layer applied to each pixel's patches (DeepMind's convolution after
            patching); `None`: the patches themselves.
        flow_rescale_factor (`float`, *optional*, defaults to 100.0):
            Flow: the decoder's output is divided by this (DeepMind's output rescaling), so a network of unit-scale
            activations predicts flows of a few pixels.
        modalities (`list[dict]`, *optional*):
            Multimodal: the modalities, each a plain dict with `name`, `channels`, `num_axes`, `num_freq_bands`,
            `max_freq` and optionally `vocab_size` (token ids embedded to `channels`), `split_across_layers`,
            `max_length` and `patch_size`, and for autoencoding per-axis `max_freq` / `patch_size` lists, `one_hot`,
            `mask_token` and `mask_prob`; see `perceiver_hf.adapters_multimodal.ModalitySpec`.
        modality_encoding (`str`, *optional*, defaults to `"add"`):
            Multimodal: `"add"` (zero-pad each modality to the common width, add a learned modality embedding) or
            `"concat"` (pad each modality with its own learned vector, as DeepMind's multimodal preprocessor).
        modality_padding (`int`, *optional*, defaults to 0):
            Multimodal, `"concat"`: learned padding channels that even the widest modality gets (at least 1).
        pooling (`str`, *optional*, defaults to `"decoder"`):
            Classification heads: how the latents feed the classifier: `"decoder"` (learned queries cross-attend
            to the latents) or `"mean"` (mean over latents, then LayerNorm and a linear layer, as lucidrains'
            Perceiver); multimodal classification also takes `"latents"` (latent `i` feeds task head `i`) and
            `"none"` (no head: the latents are returned).
        task_num_labels (`list[int]`, *optional*):
            Multimodal classification: classes of each task head (several tasks); `None`: one task of
            `num_labels` classes.
        autoencoding_outputs (`list[dict]`, *optional*):
            Multimodal autoencoding: the modalities to reconstruct, each a plain dict with `name` (an input
            modality), for continuous ones `shape` (output size per axis) and optionally `patch_size` (values per
            query and axis), `num_freq_bands` / `max_freq` (the queries' Fourier features; default: the input's),
            for one-hot ones `query_channels` (width of the learned query), and `loss_weight` (default 1.0: the
            total loss is the weighted sum of the modalities' losses). See
            `perceiver_hf.adapters_multimodal.AutoencodingOutputSpec`.
        autoencoding_query_padding (`int`, *optional*, defaults to 2):
            Multimodal autoencoding: learned padding channels of the widest modality's queries (every modality's
            queries are padded to a common width with a learned per-modality vector).
        autoencoding_output_channels (`int`, *optional*):
            Multimodal autoencoding: width of the decoder's shared output projection (DeepMind: 512) before the
            per-modality output layers; `None`: the query width.
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
        mlm_decoder_queries (`str`, *optional*, defaults to `"positions"`):
            Masked LM: the decoder's queries. `"positions"`: one learned query per position, as DeepMind's
            model (no query residual); `"inputs"`: each position's adapted input (token + position embedding,
            plus the context convolution when `context_kernel_size` is set), added back after the
            cross-attention. With `"inputs"` a masked token is predicted from its own neighbourhood plus what the
            latents hold, so training leaves the unigram plateau far sooner (see `examples/README.md`).
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
        attention_output_dropout / mlp_output_dropout (`float`, *optional*):
            Dropout on the attention branch's output / the MLP's output before the residual sum, when it differs
            from `dropout` (lucidrains' perceiver-pytorch: none on the attention branch; `None`: `dropout`).
        mlp_hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout between the MLP's two linear layers (the multi-modality fork's feed-forward).
        cross_attention_inverted (`list[bool]`, *optional*):
            Per encoder cross-attention layer, whether its attention is inverted (lucidrains' `inverted_cross_attn`:
            a softmax over the latents, so that they compete for each input, then each latent's weights
            renormalised to sum to 1). `None`: no layer is.
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
        input_adapter_config: dict[str, Any] | None = None,
        # multimodal classification
        pooling: str = "decoder",
        task_num_labels: list[int] | None = None,
        # multimodal autoencoding
        autoencoding_outputs: list[dict[str, Any]] | None = None,
        autoencoding_query_padding: int = 2,
        autoencoding_output_channels: int | None = None,
        # encoder
        num_latents: int = 256,
        d_latents: int = 512,
        num_cross_attention_layers: int = 1,
        num_self_attention_blocks: int = 1,
        num_self_attention_layers_per_block: int = 6,
        first_cross_attention_layer_shared: bool = False,
        first_self_attention_block_shared: bool = True,
        cross_attention_weight_sharing: list[int] | None = None,
        self_attention_weight_sharing: list[list[int]] | None = None,
        num_cross_attention_heads: int = 1,
        num_self_attention_heads: int = 8,
        cross_attention_qk_channels: int | None = None,
        cross_attention_v_channels: int | None = None,
        self_attention_qk_channels: int | None = None,
        self_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        self_attention_widening_factor: int = 1,
        use_query_residual: bool = True,
        self_attention_block_residual: bool = False,
        qkv_bias: bool = True,
        # decoder
        num_decoder_heads: int = 1,
        decoder_qk_channels: int | None = None,
        decoder_v_channels: int | None = None,
        decoder_widening_factor: int = 1,
        decoder_use_query_residual: bool | None = None,
        decoder_use_mlp: bool = True,
        num_output_queries: int = 1,
        d_output_queries: int | None = None,
        mlm_decoder_queries: str = "positions",
        decode_masked_only: bool = True,
        freeze_encoder: bool = False,
        # shared
        hidden_act: str = "gelu",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention_output_dropout: float | None = None,
        mlp_output_dropout: float | None = None,
        mlp_hidden_dropout: float = 0.0,
        cross_attention_inverted: list[bool] | None = None,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        # The adapter's settings may also be given as flat keywords (`PerceiverConfig(vocab_size=...)`, as in
        # release 0.1.0); an explicit `input_adapter_config` wins. Another adapter's setting is a mistake.
        all_settings = _all_adapter_settings()
        flat_settings = {name: kwargs.pop(name) for name in list(kwargs) if name in all_settings}
        _require_choice("input_adapter", input_adapter, list(INPUT_ADAPTERS))
        defaults = input_adapter_settings(input_adapter)
        for name, value in flat_settings.items():
            if name not in defaults:
                owners = [kind for kind in INPUT_ADAPTERS if name in input_adapter_settings(kind)]
                raise ValueError(
                    f"{name} ({value!r}) is a setting of input_adapter {' / '.join(map(repr, owners))}, not of "
                    f"input_adapter={input_adapter!r}; its settings are {sorted(defaults)}"
                )
        if input_adapter_config is not None and not isinstance(input_adapter_config, dict):
            raise ValueError(f"input_adapter_config ({input_adapter_config!r}) must be a dict of settings or None")
        unknown = sorted(set(input_adapter_config or {}) - set(defaults))
        if unknown:
            raise ValueError(
                f"input_adapter_config has settings {unknown} that input_adapter={input_adapter!r} does not use; "
                f"its settings are {sorted(defaults)}"
            )
        settings = copy.deepcopy(defaults)
        settings.update({k: v for k, v in flat_settings.items() if k in defaults})
        settings.update(copy.deepcopy(input_adapter_config or {}))
        if settings.get("image_size") is not None and not isinstance(settings["image_size"], (int, str)):
            settings["image_size"] = list(settings["image_size"])
        if settings.get("modalities") is not None:
            # Plain dicts (not objects) keep config.json plain JSON.
            settings["modalities"] = [dict(m) for m in settings["modalities"]]
        # Set through __dict__: __setattr__ routes adapter settings into this dict.
        self.__dict__["input_adapter_config"] = settings
        self.input_adapter = input_adapter
        self.pooling = pooling
        self.task_num_labels = None if task_num_labels is None else list(task_num_labels)
        self.autoencoding_outputs = None if autoencoding_outputs is None else [dict(o) for o in autoencoding_outputs]
        self.autoencoding_query_padding = autoencoding_query_padding
        self.autoencoding_output_channels = autoencoding_output_channels
        self.num_latents = num_latents
        self.d_latents = d_latents
        self.num_cross_attention_layers = num_cross_attention_layers
        self.num_self_attention_blocks = num_self_attention_blocks
        self.num_self_attention_layers_per_block = num_self_attention_layers_per_block
        self.first_cross_attention_layer_shared = first_cross_attention_layer_shared
        self.first_self_attention_block_shared = first_self_attention_block_shared
        self.cross_attention_weight_sharing = (
            None if cross_attention_weight_sharing is None else list(cross_attention_weight_sharing)
        )
        self.self_attention_weight_sharing = (
            None if self_attention_weight_sharing is None else [list(block) for block in self_attention_weight_sharing]
        )
        self.num_cross_attention_heads = num_cross_attention_heads
        self.num_self_attention_heads = num_self_attention_heads
        self.cross_attention_qk_channels = cross_attention_qk_channels
        self.cross_attention_v_channels = cross_attention_v_channels
        self.self_attention_qk_channels = self_attention_qk_channels
        self.self_attention_v_channels = self_attention_v_channels
        self.cross_attention_widening_factor = cross_attention_widening_factor
        self.self_attention_widening_factor = self_attention_widening_factor
        self.use_query_residual = use_query_residual
        self.self_attention_block_residual = self_attention_block_residual
        self.qkv_bias = qkv_bias
        self.num_decoder_heads = num_decoder_heads
        self.decoder_qk_channels = decoder_qk_channels
        self.decoder_v_channels = decoder_v_channels
        self.decoder_widening_factor = decoder_widening_factor
        self.decoder_use_query_residual = decoder_use_query_residual
        self.decoder_use_mlp = decoder_use_mlp
        self.num_output_queries = num_output_queries
        self.d_output_queries = d_output_queries
        self.mlm_decoder_queries = mlm_decoder_queries
        self.decode_masked_only = decode_masked_only
        self.freeze_encoder = freeze_encoder
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.attention_output_dropout = attention_output_dropout
        self.mlp_output_dropout = mlp_output_dropout
        self.mlp_hidden_dropout = mlp_hidden_dropout
        self.cross_attention_inverted = None if cross_attention_inverted is None else list(cross_attention_inverted)
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_perceiver()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PretrainedConfig.from_dict`, migrating the flat configs of release 0.1.0 first (every adapter's settings
        at the top level): the chosen adapter's settings move under `input_adapter_config`, the other adapters'
        are dropped (they never shaped the model)."""
        if "input_adapter_config" not in config_dict:
            config_dict = dict(config_dict)
            input_adapter = config_dict.get("input_adapter", "text")
            own = input_adapter_settings(input_adapter) if input_adapter in INPUT_ADAPTERS else {}
            config_dict["input_adapter_config"] = {name: config_dict[name] for name in own if name in config_dict}
            for name in _all_adapter_settings():
                config_dict.pop(name, None)
        return super().from_dict(config_dict, **kwargs)

    # The chosen adapter's settings read and write as attributes (`config.vocab_size`), as in a flat config, so
    # transformers' own code (`resize_token_embeddings` sets `config.vocab_size`) and user code keep working;
    # another adapter's settings do not exist on this config.
    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("input_adapter_config")
        if settings is not None and name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        settings = self.__dict__.get("input_adapter_config")
        if settings is not None and name in settings:
            settings[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def weight_sharing(self) -> tuple[list[int], list[list[int]]]:
        """`(cross, self)`: the weight set of each cross-attention layer and of each layer of each self-attention
        block (the explicit `*_weight_sharing` lists when given, else the pattern of the `first_*_shared` flags)."""
        cross, self_ = default_weight_sharing(
            self.num_cross_attention_layers,
            self.num_self_attention_blocks,
            self.num_self_attention_layers_per_block,
            self.first_cross_attention_layer_shared,
            self.first_self_attention_block_shared,
        )
        return (
            self.cross_attention_weight_sharing if self.cross_attention_weight_sharing is not None else cross,
            self.self_attention_weight_sharing if self.self_attention_weight_sharing is not None else self_,
        )

    def validate_perceiver(self) -> None:
        """Raise a `ValueError` naming the setting, its value and what was expected, for the first
        inconsistent or out-of-range setting. The one place where a config is checked."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            _require_choice(name, getattr(self, name), allowed)

        def positive_int(name: str, optional: bool = False) -> None:
            _require_positive_int(name, getattr(self, name), optional)

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

        def sharing_pattern(name: str, pattern: list[int]) -> None:
            # Weight sets are numbered in order of first use (0, 1, 2, ...), so each pattern has one spelling.
            seen = 0
            for index in pattern:
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= seen:
                    raise ValueError(
                        f"{name} ({getattr(self, name)!r}) must number weight sets 0, 1, 2, ... in order of first "
                        f"use (a new set is the next unused number), got {index!r} after sets 0..{seen - 1}"
                    )
                seen = max(seen, index + 1)

        choice("input_adapter", tuple(INPUT_ADAPTERS))
        choice("hidden_act", HIDDEN_ACTIVATIONS)
        choice("mlm_decoder_queries", MLM_DECODER_QUERIES)
        choice("pooling", POOLINGS)
        for name in (
            "num_latents", "d_latents", "num_cross_attention_layers", "num_self_attention_blocks",
            "num_self_attention_layers_per_block", "num_cross_attention_heads", "num_self_attention_heads",
            "cross_attention_widening_factor", "self_attention_widening_factor", "num_decoder_heads",
            "decoder_widening_factor", "num_output_queries",
        ):  # fmt: skip
            positive_int(name)
        for name in (
            "cross_attention_qk_channels", "cross_attention_v_channels", "self_attention_qk_channels",
            "self_attention_v_channels", "decoder_qk_channels", "decoder_v_channels", "d_output_queries",
        ):  # fmt: skip
            positive_int(name, optional=True)
        probability("dropout")
        probability("attention_dropout")
        probability("mlp_hidden_dropout")
        for name in ("attention_output_dropout", "mlp_output_dropout"):
            if getattr(self, name) is not None:
                probability(name)
        if self.cross_attention_inverted is not None and (
            len(self.cross_attention_inverted) != self.num_cross_attention_layers
            or not all(isinstance(flag, bool) for flag in self.cross_attention_inverted)
        ):
            raise ValueError(
                f"cross_attention_inverted ({self.cross_attention_inverted!r}) must be one True/False per "
                f"cross-attention layer (num_cross_attention_layers={self.num_cross_attention_layers})"
            )
        adapter_class = INPUT_ADAPTERS[self.input_adapter]
        if adapter_class is None:
            positive_int("num_input_channels")
        else:
            adapter_class.validate_config(self)
        if self.num_cross_attention_layers > self.num_self_attention_blocks:
            raise ValueError(
                f"num_cross_attention_layers ({self.num_cross_attention_layers}) must not exceed "
                f"num_self_attention_blocks ({self.num_self_attention_blocks}): each cross-attention layer "
                "is followed by a self-attention block"
            )
        if self.cross_attention_weight_sharing is not None:
            if len(self.cross_attention_weight_sharing) != self.num_cross_attention_layers:
                raise ValueError(
                    f"cross_attention_weight_sharing ({self.cross_attention_weight_sharing!r}) must give one weight "
                    f"set per cross-attention layer (num_cross_attention_layers={self.num_cross_attention_layers})"
                )
            sharing_pattern("cross_attention_weight_sharing", self.cross_attention_weight_sharing)
        if self.self_attention_weight_sharing is not None:
            blocks = self.self_attention_weight_sharing
            if len(blocks) != self.num_self_attention_blocks or any(
                len(block) != self.num_self_attention_layers_per_block for block in blocks
            ):
                raise ValueError(
                    f"self_attention_weight_sharing ({blocks!r}) must give num_self_attention_blocks "
                    f"({self.num_self_attention_blocks}) lists of num_self_attention_layers_per_block "
                    f"({self.num_self_attention_layers_per_block}) weight sets"
                )
            sharing_pattern("self_attention_weight_sharing", [index for block in blocks for index in block])
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
            "decode_masked_only", "freeze_encoder", "tie_word_embeddings", "qkv_bias", "decoder_use_mlp",
            "self_attention_block_residual",
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
        if (
            self.pad_token_id is not None
            and self.input_adapter == "text"
            and not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")
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
        positive_int("autoencoding_output_channels", optional=True)
        if (
            isinstance(self.autoencoding_query_padding, bool)
            or not isinstance(self.autoencoding_query_padding, int)
            or self.autoencoding_query_padding < 0
        ):
            raise ValueError(
                f"autoencoding_query_padding ({self.autoencoding_query_padding!r}) must be an integer >= 0"
            )
        if self.autoencoding_outputs is not None:
            if self.input_adapter != "multimodal":
                raise ValueError(
                    f"autoencoding_outputs needs input_adapter='multimodal' (the modalities it reconstructs), "
                    f"got input_adapter={self.input_adapter!r}"
                )
            validate_autoencoding_outputs(self.autoencoding_outputs, self.modalities)
