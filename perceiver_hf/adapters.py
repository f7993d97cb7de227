"""Input and output adapters: the task-specific ends of a Perceiver IO model.

The contract (one for every modality and task):

- An **input adapter** maps raw inputs to a `(batch, positions, channels)` array and declares
  `num_input_channels`, the `channels` of that array. The encoder cross-attends from its latents to it.
- An **output adapter** declares `output_shape = (num_queries, num_query_channels)`, the shape of the
  decoder's output queries, and maps the decoder output `(batch, num_queries, num_query_channels)` to
  task outputs (logits). The decoder owns a trainable query array of that shape; a caller may pass
  other queries instead (masked LM passes the queries of the input positions).

Shapes: B batch, N input positions, C channels, Q output queries, V vocabulary, K classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import FourierPositionEncoding, LearnedPositionEncoding

if TYPE_CHECKING:
    from .configuration_perceiver import PerceiverConfig

__all__ = [
    "InputAdapter",
    "OutputAdapter",
    "move_channels_last",
    "concat_positions",
    "TextInputAdapter",
    "ImageInputAdapter",
    "ConvDownsample",
    "space_to_depth",
    "TextOutputAdapter",
    "ClassificationOutputAdapter",
]


def _require_positive_int(name: str, value: object, optional: bool = False) -> None:
    """Raise a `ValueError` unless `value` is an integer >= 1 (or `None` when `optional`): a size of 0 or less would
    otherwise build empty layers that fail (or silently return nothing) only when data flows through them."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


def _require_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} ({value!r}) must be one of {list(allowed)}")


def _require_max_frequency(value: object) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"max_frequency ({value!r}) must be positive or None")


def _require_context_kernel_size(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0):
        raise ValueError(f"context_kernel_size ({value!r}) must be an odd positive integer or None")


def _require_positive_ints(**values: object) -> None:
    """`_require_positive_int` of each keyword argument, in order."""
    for name, value in values.items():
        _require_positive_int(name, value)


class InputAdapter(nn.Module):
    """Base class of input adapters: `forward(inputs) -> (B, N, num_input_channels)`.

    An adapter with `adapts_attention_mask = True` takes the caller's attention mask with its inputs and returns
    `(features, position mask (B, N) or None)` (audio: a sample mask becomes a patch mask).
    """

    adapts_attention_mask = False
    # The adapter's settings in `PerceiverConfig.input_adapter_config` and their defaults (plain JSON values), for
    # adapters that are built from a config (`from_config`).
    config_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, num_input_channels: int) -> None:
        super().__init__()
        self.num_input_channels = num_input_channels

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> InputAdapter:
        """The adapter that `config` describes (its settings are `config.input_adapter_config`)."""
        raise NotImplementedError(f"{cls.__name__} is not built from a PerceiverConfig")

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        """Raise a `ValueError` naming the first of this adapter's settings in `config` that it cannot take
        (`PerceiverConfig` calls this when it validates itself)."""


def move_channels_last(data: torch.Tensor, num_channels: int) -> torch.Tensor | None:
    """Channels-last `(B, *A, C)` data as it is, channels-first `(B, C, *A)` data moved to channels-last (a view);
    `None` when neither axis 1 nor the last axis has `num_channels` entries (the caller raises its own error).

    The last axis wins when both fit, as in the original Perceiver's channels-last layout.
    """
    if data.shape[-1] == num_channels:
        return data
    if data.shape[1] == num_channels:
        return data.movedim(1, -1)
    return None


def concat_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Features `(B, N, C)` and position features `(N, P)` shared by the batch -> `(B, N, C + P)`."""
    return torch.cat([features, positions.expand(features.shape[0], -1, -1)], dim=-1)


class OutputAdapter(nn.Module):
    """Base class of output adapters: decoder output `(B, Q, C)` -> task outputs.

    `output_shape` is `(Q, C)`, the shape of the decoder's trainable output queries.
    """

    def __init__(self, output_shape: tuple[int, int]) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)


class TextInputAdapter(InputAdapter):
    """Token embeddings plus learned position embeddings, optionally mixed with their neighbours'.

    With `context_kernel_size` k, a 1D convolution over the sequence adds to each position a learned function
    of the k embeddings centred on it (residually). The latents' cross-attention then reads n-gram features
    instead of single tokens, and a masked LM whose decoder queries are its inputs
    (`mlm_decoder_queries="inputs"`) predicts a masked token from its neighbours directly. Padding (attention
    mask 0) is zeroed before the convolution, so a text's features do not depend on how much padding follows.

    Args:
        vocab_size: number of token ids.
        max_seq_len: number of learned positions; longer inputs raise a `ValueError`.
        num_input_channels: embedding width.
        context_kernel_size: odd width of the context convolution; `None` (default) for none.
    """

    # Takes the attention mask (to keep padding out of the context convolution) and passes it on unchanged.
    adapts_attention_mask = True
    config_settings = {"vocab_size": 10000, "max_position_embeddings": 512, "d_model": 256, "context_kernel_size": None}

    def __init__(
        self, vocab_size: int, max_seq_len: int, num_input_channels: int, context_kernel_size: int | None = None
    ) -> None:
        _require_positive_ints(vocab_size=vocab_size, max_seq_len=max_seq_len, num_input_channels=num_input_channels)
        _require_context_kernel_size(context_kernel_size)
        super().__init__(num_input_channels)
        self.token_embedding = nn.Embedding(vocab_size, num_input_channels)
        self.position_embedding = LearnedPositionEncoding(max_seq_len, num_input_channels)
        self.context = (
            None
            if context_kernel_size is None
            else nn.Conv1d(
                num_input_channels, num_input_channels, context_kernel_size, padding=context_kernel_size // 2
            )
        )

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> TextInputAdapter:
        return cls(config.vocab_size, config.max_position_embeddings, config.d_model, config.context_kernel_size)

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        for name in ("vocab_size", "max_position_embeddings", "d_model"):
            _require_positive_int(name, getattr(config, name))
        _require_context_kernel_size(config.context_kernel_size)

    @property
    def vocab_size(self) -> int:
        """The number of token ids: the embedding's rows (`resize_token_embeddings` changes it)."""
        return self.token_embedding.num_embeddings

    @property
    def max_seq_len(self) -> int:
        """The number of learned positions: the position table's rows (`resize_position_embeddings` changes it)."""
        return self.position_embedding.weight.shape[0]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            input_ids: `(B, N)` token ids.
            attention_mask: `(B, N)`, 1 for tokens, 0 for padding.

        Returns:
            `(features (B, N, C), attention_mask)`, the mask as given.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        seq_len = input_ids.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"input_ids has length {seq_len}, longer than the model's {self.max_seq_len} positions "
                "(max_position_embeddings); truncate the input"
            )
        # An id outside the vocabulary fails deep in the embedding (IndexError on CPU, a device assert on GPU),
        # typically because the tokenizer is not the model's. Checking needs the values, so a compiled graph
        # skips it, as the attention-mask check does.
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.aminmax(input_ids)
            low, high = int(low), int(high)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"input_ids must be token ids in [0, vocab_size={self.vocab_size}), got ids from {low} to {high}; "
                    "is the tokenizer the model's own?"
                )
        x = self.token_embedding(input_ids) + self.position_embedding(seq_len)  # (B, N, C)
        if self.context is not None:
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            unpadded = x if attention_mask is None else x * attention_mask.unsqueeze(-1).to(x.dtype)
            x = x + self.context(unpadded.transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        return x, attention_mask


IMAGE_PREPROCESSINGS = ("pixels", "conv", "patches")
CONV_PADDINGS = ("same", "transformers")
POSITION_ENCODINGS = ("fourier", "learned")
# Width of learned image position embeddings when none is configured: that of 64-band Fourier features of 2 axes.
DEFAULT_LEARNED_POSITION_CHANNELS = 258


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow/Haiku `"SAME"` padding `(before, after)` of one axis: the output has `ceil(size / stride)`
    positions and the extra padding goes after, as in DeepMind's checkpoints."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes of `x` for a TensorFlow "SAME" convolution or pooling."""
    (top, bottom), (left, right) = (_same_padding(n, kernel_size, stride) for n in x.shape[-2:])
    return F.pad(x, (left, right, top, bottom), value=value)


class ConvDownsample(nn.Module):
    """DeepMind's Perceiver IO "conv" image preprocessing (`Conv2DDownsample`), 4x downsampling per layer.

    Each layer: `Conv2d(7x7, stride 2, no bias)` -> `BatchNorm2d` -> ReLU -> `MaxPool(3x3, stride 2)`.

    `padding` chooses how the borders are padded:

    - `"same"` (DeepMind's): TensorFlow "SAME" padding of both the convolution and the max-pool, so a `(H, W)`
      image becomes `(ceil(H / 4), ceil(W / 4))` per layer (224 -> 56, as in DeepMind's ImageNet model).
    - `"transformers"`: what transformers' port of the stem (`Conv2DDownsample`) computes, for exact parity
      with its converted checkpoints: a fixed 3-pixel zero padding of the convolution on every side and an
      unpadded max-pool, so `(H, W)` becomes `((ceil(H / 2) - 3) // 2 + 1, ...)` (224 -> 55). For an even
      size this shifts the convolution by one pixel against "SAME" (which pads 2 before and 3 after).

    Args:
        in_channels: channels of the input images.
        out_channels: channels of every convolution's output.
        num_layers: number of conv + max-pool layers (downsampling by `4 ** num_layers`).
        use_batchnorm: apply `BatchNorm2d` after each convolution.
        padding: `"same"` or `"transformers"`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 64,
        num_layers: int = 1,
        use_batchnorm: bool = True,
        padding: str = "same",
    ):
        if padding not in CONV_PADDINGS:
            raise ValueError(f"padding ({padding!r}) must be one of {list(CONV_PADDINGS)}")
        super().__init__()
        self.padding = padding
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer = nn.Module()
            layer.conv = nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 7, stride=2, bias=False)
            layer.batchnorm = nn.BatchNorm2d(out_channels) if use_batchnorm else nn.Identity()
            self.layers.append(layer)

    @staticmethod
    def output_size(size: int, num_layers: int, padding: str = "same") -> int:
        """Size of one spatial axis after `num_layers` layers (0: too small for the unpadded max-pool)."""
        for _ in range(num_layers):
            size = math.ceil(size / 2)  # the convolution, with either padding
            size = math.ceil(size / 2) if padding == "same" else max((size - 3) // 2 + 1, 0)
        return size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, out_channels, H', W')`."""
        x = images
        same = self.padding == "same"
        for i, layer in enumerate(self.layers):
            x = layer.conv(_pad_same(x, 7, 2) if same else F.pad(x, (3, 3, 3, 3)))
            x = F.relu(layer.batchnorm(x))
            if same:
                # Padding with -inf makes "SAME" max-pooling ignore the padded positions, as TensorFlow does.
                x = _pad_same(x, 3, 2, value=float("-inf"))
            elif min(x.shape[-2:]) < 3:
                raise ValueError(
                    f"images of size {tuple(images.shape[-2:])} are too small for the 'conv' preprocessing with "
                    f"padding='transformers': the unpadded 3x3 max-pool of layer {i + 1} gets "
                    f"{tuple(x.shape[-2:])} features"
                )
            x = F.max_pool2d(x, kernel_size=3, stride=2)
        return x


def space_to_depth(images: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rearrange non-overlapping `block_size` x `block_size` patches into channels.

    `(B, H, W, C)` -> `(B, H / block_size, W / block_size, block_size * block_size * C)`, channel order
    `(row in patch, column in patch, channel)` as DeepMind's and transformers' `space_to_depth`.
    """
    b, h, w, c = images.shape
    if h % block_size or w % block_size:
        raise ValueError(
            f"image size ({h}, {w}) must be divisible by spatial_downsample ({block_size}) for 'patches' preprocessing"
        )
    x = images.reshape(b, h // block_size, block_size, w // block_size, block_size, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/s, W/s, s, s, C)
    return x.reshape(b, h // block_size, w // block_size, block_size * block_size * c)


class ImageInputAdapter(InputAdapter):
    """Image features with Fourier (or learned) position features concatenated along the channels.

    Accepts channels-last `(B, H, W, C)` images, as the original Perceiver IO library, and
    channels-first `(B, C, H, W)` `pixel_values`, as transformers' image processors produce. The
    pixels are first preprocessed as one of DeepMind's Perceiver IO options:

    - `"pixels"`: the pixels themselves (every `spatial_downsample`-th row and column when it is > 1);
    - `"patches"`: space-to-depth of `spatial_downsample` x `spatial_downsample` patches (no convolution);
    - `"conv"`: `ConvDownsample` (conv 7x7 stride 2, BatchNorm, ReLU, max-pool 3x3 stride 2), 4x
      downsampling per layer (`spatial_downsample` must be a power of 4).

    For "pixels" and "patches", `num_projection_channels` adds a linear projection of each position's
    features (DeepMind's "conv1x1" is "pixels" with a projection). Position features are computed on
    the preprocessed grid, optionally projected linearly (`num_position_projection_channels`, DeepMind's
    `project_pos_dim`). Fourier features are cached per shape, device and dtype, and serve images of
    other sizes than configured (with the configured `max_frequencies`); learned positions fix the size
    unless `forward(..., interpolate_pos_encoding=True)` resizes them.

    Args:
        image_shape: configured `(height, width, channels)`.
        num_frequency_bands: Fourier frequency bands per spatial axis.
        max_frequencies: highest frequency per axis (the preprocessed grid of the configured size when
            `None`: the Nyquist frequency of that grid).
        position_encoding: `"fourier"` or `"learned"` (learned positions fix the image size; see `forward`).
        num_position_channels: width of learned position embeddings.
        num_position_projection_channels: width of a linear projection of the position features (`None`:
            none).
        preprocessing: `"pixels"`, `"patches"` or `"conv"`.
        spatial_downsample: downsampling factor of the preprocessing (`None`: 1 for "pixels", 4 for
            "patches" and "conv").
        num_projection_channels: "pixels"/"patches": width of an optional linear projection (`None`: no
            projection); "conv": the convolutions' output channels (`None`: 64, as DeepMind's).
        conv_padding: "conv": `ConvDownsample`'s `padding`, `"same"` (DeepMind's) or `"transformers"`.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_frequency_bands: int = 32,
        max_frequencies: Sequence[float] | None = None,
        position_encoding: str = "fourier",
        num_position_channels: int = DEFAULT_LEARNED_POSITION_CHANNELS,
        preprocessing: str = "pixels",
        spatial_downsample: int | None = None,
        num_projection_channels: int | None = None,
        num_position_projection_channels: int | None = None,
        conv_padding: str = "same",
    ) -> None:
        if len(image_shape) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in image_shape):
            raise ValueError(
                f"image_shape ({tuple(image_shape)}) must be three positive integers (height, width, channels)"
            )
        _require_positive_int("num_frequency_bands", num_frequency_bands)
        *spatial_shape, num_image_channels = image_shape
        if preprocessing not in IMAGE_PREPROCESSINGS:
            raise ValueError(f"preprocessing ({preprocessing!r}) must be one of {list(IMAGE_PREPROCESSINGS)}")
        if spatial_downsample is None:
            spatial_downsample = 1 if preprocessing == "pixels" else 4
        if isinstance(spatial_downsample, bool) or not isinstance(spatial_downsample, int) or spatial_downsample < 1:
            raise ValueError(f"spatial_downsample ({spatial_downsample!r}) must be a positive integer")
        for name, value in (
            ("num_projection_channels", num_projection_channels),
            ("num_position_projection_channels", num_position_projection_channels),
        ):
            if value is not None:
                _require_positive_int(name, value)
        if conv_padding not in CONV_PADDINGS:
            raise ValueError(f"conv_padding ({conv_padding!r}) must be one of {list(CONV_PADDINGS)}")

        preprocessor: nn.Module | None = None
        projection: nn.Module | None = None
        if preprocessing == "conv":
            num_conv_layers = round(math.log(spatial_downsample, 4))
            if spatial_downsample < 4 or 4**num_conv_layers != spatial_downsample:
                raise ValueError(
                    f"spatial_downsample ({spatial_downsample}) must be a power of 4 (4, 16, ...) for 'conv' "
                    "preprocessing: each conv + max-pool layer downsamples 4x"
                )
            num_features = num_projection_channels or 64
            preprocessor = ConvDownsample(num_image_channels, num_features, num_conv_layers, padding=conv_padding)
            grid = [ConvDownsample.output_size(n, num_conv_layers, conv_padding) for n in spatial_shape]
            if 0 in grid:
                raise ValueError(
                    f"image size {tuple(spatial_shape)} is too small for 'conv' preprocessing with "
                    f"conv_padding='transformers' and spatial_downsample={spatial_downsample}: the unpadded "
                    "max-pool leaves no positions"
                )
        else:
            if preprocessing == "patches":
                if any(n % spatial_downsample for n in spatial_shape):
                    raise ValueError(
                        f"image size {tuple(spatial_shape)} must be divisible by spatial_downsample "
                        f"({spatial_downsample}) for 'patches' preprocessing"
                    )
                num_features = num_image_channels * spatial_downsample**2
            else:
                num_features = num_image_channels
            grid = [math.ceil(n / spatial_downsample) for n in spatial_shape]
            if num_projection_channels is not None:
                projection = nn.Linear(num_features, num_projection_channels)
                num_features = num_projection_channels

        if position_encoding == "fourier":
            if max_frequencies is None:
                max_frequencies = grid
            encoding: nn.Module = FourierPositionEncoding(len(grid), num_frequency_bands, max_frequencies)
            num_position_channels = encoding.num_channels
        elif position_encoding == "learned":
            _require_positive_int("num_position_channels", num_position_channels)
            encoding = LearnedPositionEncoding(math.prod(grid), num_position_channels)
        else:
            raise ValueError(f"position_encoding ({position_encoding!r}) must be 'fourier' or 'learned'")
        position_projection: nn.Module | None = None
        if num_position_projection_channels is not None:
            position_projection = nn.Linear(num_position_channels, num_position_projection_channels)
            num_position_channels = num_position_projection_channels
        super().__init__(num_features + num_position_channels)
        self.image_shape = tuple(image_shape)
        self.spatial_shape = tuple(spatial_shape)
        self.grid_shape = tuple(grid)  # positions of the configured image after preprocessing
        self.num_image_channels = num_image_channels
        self.preprocessing = preprocessing
        self.spatial_downsample = spatial_downsample
        self.position_encoding_type = position_encoding
        # Only the modules a variant needs are registered, so "pixels" keeps the original state-dict names.
        if preprocessor is not None:
            self.preprocessor = preprocessor
        if projection is not None:
            self.projection = projection
        self.position_encoding = encoding
        if position_projection is not None:
            self.position_projection = position_projection

    config_settings = {
        "image_size": [224, 224],
        "num_channels": 3,
        "num_frequency_bands": 64,
        "max_frequency": None,
        "image_position_encoding": "fourier",
        "image_preprocessing": "pixels",
        "spatial_downsample": None,
        "image_projection_channels": None,
        "image_position_channels": None,
        "image_position_projection_channels": None,
        "image_conv_padding": "same",
    }

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        _require_choice("image_position_encoding", config.image_position_encoding, POSITION_ENCODINGS)
        _require_choice("image_preprocessing", config.image_preprocessing, IMAGE_PREPROCESSINGS)
        _require_choice("image_conv_padding", config.image_conv_padding, CONV_PADDINGS)
        _require_positive_ints(num_channels=config.num_channels, num_frequency_bands=config.num_frequency_bands)
        for name in (
            "spatial_downsample", "image_projection_channels", "image_position_channels",
            "image_position_projection_channels",
        ):  # fmt: skip
            _require_positive_int(name, getattr(config, name), optional=True)
        _require_max_frequency(config.max_frequency)
        image_size = config.image_size
        if len(image_size) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in image_size):
            raise ValueError(f"image_size ({image_size!r}) must be two positive integers (height, width)")
        downsample = config.spatial_downsample
        is_power_of_4 = downsample is not None and downsample >= 4 and 4 ** round(math.log(downsample, 4)) == downsample
        if config.image_preprocessing == "conv" and downsample is not None and not is_power_of_4:
            raise ValueError(
                f"spatial_downsample ({downsample}) must be a power of 4 (4, 16, ...) for image_preprocessing='conv'"
            )
        if config.image_position_channels is not None and config.image_position_encoding != "learned":
            raise ValueError(
                f"image_position_channels ({config.image_position_channels}) sets the width of learned position "
                f"embeddings: it needs image_position_encoding='learned', not {config.image_position_encoding!r} "
                "(Fourier features have 2 * (2 * num_frequency_bands + 1) channels)"
            )
        if config.image_preprocessing == "patches" and any(size % (downsample or 4) for size in image_size):
            raise ValueError(
                f"image_size ({image_size}) must be divisible by spatial_downsample ({downsample or 4}) for "
                "image_preprocessing='patches'"
            )

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> ImageInputAdapter:
        height, width = config.image_size
        return cls(
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

    def to_channels_last(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` or `(B, C, H, W)` -> `(B, H, W, C)`."""
        c = self.num_image_channels
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (batch, height, width, {c}) or (batch, {c}, height, width), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating point tensor, got dtype {images.dtype}")
        if 0 in images.shape:
            raise ValueError(
                f"images must hold at least one image of at least 1x1 pixels, got shape {tuple(images.shape)}"
            )
        channels_last = move_channels_last(images, c)
        if channels_last is not None:
            return channels_last
        raise ValueError(
            f"images of shape {tuple(images.shape)} have no axis of {c} channels at position 1 or -1 "
            f"(expected (batch, height, width, {c}) or (batch, {c}, height, width))"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Channels-last images `(B, H, W, C)` -> preprocessed features `(B, H', W', C')`."""
        s = self.spatial_downsample
        if self.preprocessing == "conv":
            x = self.preprocessor(images.permute(0, 3, 1, 2))  # (B, C', H', W')
            return x.permute(0, 2, 3, 1)
        x = space_to_depth(images, s) if self.preprocessing == "patches" else images[:, ::s, ::s] if s > 1 else images
        return self.projection(x) if hasattr(self, "projection") else x

    def forward(self, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`images` `(B, H, W, C)` or `(B, C, H, W)` -> `(B, H'*W', C' + P)` input features.

        `interpolate_pos_encoding`: learned positions are resized (bicubic, as transformers' and ViT's
        `interpolate_pos_encoding`) to images of another size than configured; Fourier features fit any
        size without it.
        """
        images = self.to_channels_last(images)  # (B, H, W, C)
        x = self.preprocess(images)  # (B, H', W', C')
        b, *grid, c = x.shape
        if self.position_encoding_type == "fourier":
            positions = self.position_encoding(grid, x.device, x.dtype)  # (H'*W', P)
        elif tuple(grid) == self.grid_shape:
            positions = self.position_encoding(math.prod(grid))  # (H'*W', P)
        elif interpolate_pos_encoding:
            positions = self.interpolated_positions(tuple(grid))
        else:
            raise ValueError(
                f"images of size {tuple(images.shape[1:3])} do not match the learned positions of the "
                f"configured size {self.spatial_shape}; pass interpolate_pos_encoding=True to resize the "
                "positions, or use Fourier position encoding for variable sizes"
            )
        if hasattr(self, "position_projection"):
            positions = self.position_projection(positions)  # (H'*W', P')
        return concat_positions(x.reshape(b, -1, c), positions)  # (B, H'*W', C' + P)

    def interpolated_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned `(H0*W0, P)` position table resized to `grid` `(H', W')` -> `(H'*W', P)`."""
        table = self.position_encoding.weight  # (H0*W0, P)
        table = table.reshape(1, *self.grid_shape, -1).permute(0, 3, 1, 2)  # (1, P, H0, W0)
        resized = nn.functional.interpolate(table, size=grid, mode="bicubic", align_corners=False)  # (1, P, H', W')
        return resized.flatten(2).squeeze(0).transpose(0, 1)  # (H'*W', P)


class TextOutputAdapter(OutputAdapter):
    """Projects each decoded position to vocabulary logits `(B, Q, V)`.

    `linear.weight` may be tied to the input token embedding (transformers does so when
    `config.tie_word_embeddings`).
    """

    def __init__(self, vocab_size: int, max_seq_len: int, num_output_channels: int) -> None:
        _require_positive_ints(vocab_size=vocab_size, max_seq_len=max_seq_len, num_output_channels=num_output_channels)
        super().__init__((max_seq_len, num_output_channels))
        self.linear = nn.Linear(num_output_channels, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # (B, Q, V)


class ClassificationOutputAdapter(OutputAdapter):
    """Maps `num_outputs` decoded queries to class logits: `(B, K)` for one query, else `(B, Q, K)`.

    Args:
        num_classes: number of classes `K`.
        num_outputs: number of output queries `Q`.
        num_output_channels: width of the output queries (`num_classes` when `None`).
    """

    def __init__(self, num_classes: int, num_outputs: int = 1, num_output_channels: int | None = None) -> None:
        if num_output_channels is None:
            num_output_channels = num_classes
        _require_positive_ints(
            num_classes=num_classes, num_outputs=num_outputs, num_output_channels=num_output_channels
        )
        super().__init__((num_outputs, num_output_channels))
        self.linear = nn.Linear(num_output_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)  # (B, Q, K)
        return logits.squeeze(1) if self.output_shape[0] == 1 else logits
