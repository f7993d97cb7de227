"""Audio input adapter: raw waveforms, one time axis, Fourier position features, optional patches.

Shapes: B batch, T samples, A audio channels, P samples per patch, N = ceil(T / P) input positions,
C adapter output channels.

Positions are encoded on a fixed grid of `ceil(max_samples / patch_size)` positions, the first N of which a
clip of N patches uses. A clip's features therefore do not depend on the length of the batch it is padded
into (the Fourier features of a grid spanning the padded length would move every position whenever the
batch's longest clip changes).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import (
    InputAdapter,
    _require_choice,
    _require_max_frequency,
    _require_positive_int,
    _require_positive_ints,
    concat_positions,
)
from .position_encoding import FourierPositionEncoding

if TYPE_CHECKING:
    from .configuration_perceiver import PerceiverConfig

__all__ = ["AudioInputAdapter", "patch_mask", "patch_features", "log_power_spectrum", "AUDIO_PREPROCESSINGS"]

AUDIO_PREPROCESSINGS = ("samples", "spectrogram")


def patch_mask(attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sample mask `(B, T)` -> patch mask `(B, ceil(T / P))`: a patch is attended to when any of its samples is."""
    b, t = attention_mask.shape
    padded = F.pad(attention_mask.bool(), (0, -t % patch_size))
    return padded.view(b, -1, patch_size).any(dim=-1)


def log_power_spectrum(frames: torch.Tensor) -> torch.Tensor:
    """`log(1 + |rfft(frame)|^2)` along the last axis: `(..., P)` -> `(..., P // 2 + 1)`, computed in float32.

    `log1p` keeps silent (and zero-padded) frames finite and is close to the log power of loud ones.
    """
    power = torch.fft.rfft(frames.float(), dim=-1).abs().square()
    return torch.log1p(power).to(frames.dtype)


def patch_features(
    x: torch.Tensor, patch_size: int, mask: torch.Tensor | None = None, spectrogram: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A channels-last sequence `(B, T, A)` -> `(patches, patch mask)`, shared by the audio and multimodal adapters.

    `patches` is `(B, N, P*A)`, sample-major within a patch, or with `spectrogram` the log power spectrum of each
    patch and channel, `(B, N, A*(P//2+1))`. Samples that `mask` `(B, T)` marks as padding are zeroed first (a patch
    may hold real and padded samples; their values must never matter), and zeros complete the last patch. The patch
    mask is `patch_mask(mask, patch_size)` `(B, N)`, or `None` without a mask.
    """
    b, t, a = x.shape
    if mask is not None:
        x = x * mask.to(x.dtype)[..., None]
    x = F.pad(x, (0, 0, 0, -t % patch_size))  # zero samples complete the last patch
    if spectrogram:
        frames = x.reshape(b, -1, patch_size, a).transpose(2, 3)  # (B, N, A, P)
        patches = log_power_spectrum(frames).flatten(2)  # (B, N, A*(P/2+1))
    else:
        patches = x.reshape(b, -1, patch_size * a)  # (B, N, P*A)
    return patches, None if mask is None else patch_mask(mask, patch_size)


class AudioInputAdapter(InputAdapter):
    """Raw waveform -> `(B, N, C)` patch features with Fourier position features concatenated.

    Each input position holds a patch of `patch_size` consecutive samples of every channel (`patch_size=1`:
    one position per sample, as the original Perceiver's raw audio), as one of:

    - `"samples"`: the samples themselves (`patch_size * A` channels);
    - `"spectrogram"`: the log power spectrum of the patch (`(patch_size // 2 + 1) * A` channels), i.e. a
      non-overlapping short-time Fourier transform with one frame per position. Cross-attention averages its
      values linearly over positions, which cancels raw waveform samples out; a per-patch spectrum keeps the
      frequency content, which is what small models on little data (spoken digits) need.

    The features may be linearly projected to `num_projection_channels`. The clip is zero-padded to a multiple
    of `patch_size`.

    This adapter also maps the feature extractor's sample-level `attention_mask` `(B, T)` to the
    position-level mask `(B, N)` the encoder needs, so it returns `(features, mask)`
    (`adapts_attention_mask = True`).

    Args:
        max_samples: longest waveform accepted; it fixes the position grid.
        patch_size: samples per input position.
        num_audio_channels: channels `A` of the waveform (1 for mono).
        num_frequency_bands: Fourier frequency bands of the time axis.
        max_frequency: highest Fourier frequency (`None`: the Nyquist frequency of the position grid).
        num_projection_channels: width of a linear projection of each patch (`None`: no projection).
        preprocessing: `"samples"` or `"spectrogram"`.
    """

    adapts_attention_mask = True

    def __init__(
        self,
        max_samples: int,
        patch_size: int = 1,
        num_audio_channels: int = 1,
        num_frequency_bands: int = 64,
        max_frequency: float | None = None,
        num_projection_channels: int | None = None,
        preprocessing: str = "samples",
    ) -> None:
        if preprocessing not in AUDIO_PREPROCESSINGS:
            raise ValueError(f"preprocessing ({preprocessing!r}) must be one of {list(AUDIO_PREPROCESSINGS)}")
        _require_positive_ints(
            max_samples=max_samples,
            patch_size=patch_size,
            num_audio_channels=num_audio_channels,
            num_frequency_bands=num_frequency_bands,
        )
        if num_projection_channels is not None:
            _require_positive_int("num_projection_channels", num_projection_channels)
        if max_frequency is not None and not max_frequency > 0:
            raise ValueError(f"max_frequency ({max_frequency!r}) must be positive or None")
        num_positions = math.ceil(max_samples / patch_size)
        encoding = FourierPositionEncoding(
            1, num_frequency_bands, (max_frequency or num_positions,), fixed_length=num_positions
        )
        per_channel = patch_size // 2 + 1 if preprocessing == "spectrogram" else patch_size
        num_patch_features = per_channel * num_audio_channels
        num_features = num_projection_channels or num_patch_features
        super().__init__(num_features + encoding.num_channels)
        self.preprocessing = preprocessing
        self.max_samples = max_samples
        self.patch_size = patch_size
        self.num_audio_channels = num_audio_channels
        self.num_positions = num_positions
        self.position_encoding = encoding
        # Registered only when used, so the raw-patch variant has no extra state-dict entries.
        if num_projection_channels is not None:
            self.projection = nn.Linear(num_patch_features, num_projection_channels)

    config_settings = {
        "max_audio_samples": 16000,
        "audio_patch_size": 1,
        "num_audio_channels": 1,
        "num_frequency_bands": 64,
        "max_frequency": None,
        "audio_projection_channels": None,
        "audio_preprocessing": "samples",
        "sampling_rate": 16000,
    }

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        _require_choice("audio_preprocessing", config.audio_preprocessing, AUDIO_PREPROCESSINGS)
        for name in (
            "max_audio_samples", "audio_patch_size", "num_audio_channels", "num_frequency_bands", "sampling_rate"
        ):  # fmt: skip
            _require_positive_int(name, getattr(config, name))
        _require_positive_int("audio_projection_channels", config.audio_projection_channels, optional=True)
        _require_max_frequency(config.max_frequency)
        if config.audio_patch_size > config.max_audio_samples:
            raise ValueError(
                f"audio_patch_size ({config.audio_patch_size}) must not exceed max_audio_samples "
                f"({config.max_audio_samples})"
            )

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> AudioInputAdapter:
        return cls(
            max_samples=config.max_audio_samples,
            patch_size=config.audio_patch_size,
            num_audio_channels=config.num_audio_channels,
            num_frequency_bands=config.num_frequency_bands,
            max_frequency=config.max_frequency,
            num_projection_channels=config.audio_projection_channels,
            preprocessing=config.audio_preprocessing,
        )

    def to_batch_time_channels(self, waveform: torch.Tensor) -> torch.Tensor:
        """`(B, T)` (mono) or channels-last `(B, T, A)` -> `(B, T, A)`, with clear errors for other shapes."""
        a = self.num_audio_channels
        if not waveform.is_floating_point():
            raise ValueError(f"input_values must be a floating point waveform, got dtype {waveform.dtype}")
        if waveform.ndim == 2 and a == 1:
            return waveform.unsqueeze(-1)
        if waveform.ndim == 3 and waveform.shape[-1] == a:
            return waveform
        expected = "(batch, samples) or (batch, samples, 1)" if a == 1 else f"(batch, samples, {a})"
        raise ValueError(f"input_values must have shape {expected}, got {tuple(waveform.shape)}")

    def forward(
        self, waveform: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            waveform: `(B, T)` or `(B, T, A)` samples, `T <= max_samples`.
            attention_mask: `(B, T)`, 1 for real samples, 0 for padding.

        Returns:
            `(features (B, N, C), position mask (B, N) or None)`.
        """
        x = self.to_batch_time_channels(waveform)  # (B, T, A)
        b, t, _ = x.shape
        if t > self.max_samples:
            raise ValueError(
                f"input_values has {t} samples, more than the model's max_audio_samples ({self.max_samples}); "
                "truncate the audio (e.g. the feature extractor's truncation=True, max_length=...)"
            )
        if t == 0:
            raise ValueError("input_values must hold at least one sample")
        if attention_mask is not None and attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask must have the shape of the waveform (batch, samples) = ({b}, {t}), "
                f"got {tuple(attention_mask.shape)}"
            )
        patches, mask = patch_features(x, self.patch_size, attention_mask, self.preprocessing == "spectrogram")
        if hasattr(self, "projection"):
            patches = self.projection(patches)  # (B, N, C - F)
        positions = self.position_encoding(patches.shape[1:2], patches.device, patches.dtype)  # (N, F)
        return concat_positions(patches, positions), mask  # (B, N, C)
