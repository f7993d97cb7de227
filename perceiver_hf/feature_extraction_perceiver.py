"""Feature extractor of Perceiver IO audio models: raw waveforms in, normalised padded `input_values` out.

transformers' own `PerceiverFeatureExtractor` (an image feature extractor) no longer exists; this one is a
`SequenceFeatureExtractor` for audio, registered with `AutoFeatureExtractor` for `PerceiverConfig`, so that
`pipeline("audio-classification", model=<saved dir>)` finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import PaddingStrategy, TensorType, logging

__all__ = ["PerceiverFeatureExtractor"]

logger = logging.get_logger(__name__)


class PerceiverFeatureExtractor(SequenceFeatureExtractor):
    r"""Audio feature extractor for Perceiver IO models: checks the sampling rate, normalises each clip to zero mean
    and unit variance, truncates to `max_length` samples and pads the batch, with an `attention_mask` (1 for real
    samples, 0 for padding).

    Args:
        feature_size (`int`, *optional*, defaults to 1):
            Channels per sample; only mono audio (1) is supported.
        sampling_rate (`int`, *optional*, defaults to 16000):
            Sampling rate the model was trained on; audio at another rate is refused (resample it first).
        padding_value (`float`, *optional*, defaults to 0.0):
            Value of the padded samples.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Normalise each clip to zero mean and unit variance (over its real samples, before padding).
        max_length (`int`, *optional*):
            Longest clip, in samples, that the model accepts (`config.max_audio_samples`); longer clips are cut to it
            unless `truncation=False` is passed. `None`: no limit.
        return_attention_mask (`bool`, *optional*, defaults to `True`):
            Return the `attention_mask` of the padded batch.

    Example:

    ```python
    >>> from perceiver_hf import PerceiverFeatureExtractor
    >>> feature_extractor = PerceiverFeatureExtractor(sampling_rate=8000, max_length=16000)
    >>> batch = feature_extractor([clip_a, clip_b], sampling_rate=8000, return_tensors="pt")
    >>> batch["input_values"].shape, batch["attention_mask"].shape  # (2, longest clip)
    ```
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        do_normalize: bool = True,
        max_length: int | None = None,
        return_attention_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        if feature_size != 1:
            raise ValueError(f"feature_size ({feature_size!r}) must be 1: the feature extractor takes mono audio")
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate < 1:
            raise ValueError(f"sampling_rate ({sampling_rate!r}) must be a positive integer (Hz)")
        bad_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        if max_length is not None and bad_length:
            raise ValueError(f"max_length ({max_length!r}) must be a positive integer (samples) or None")
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.do_normalize = do_normalize
        self.max_length = max_length

    @classmethod
    def from_perceiver_config(cls, config: Any, **kwargs: Any) -> PerceiverFeatureExtractor:
        """A feature extractor that fits an audio `PerceiverConfig`: its `sampling_rate` and `max_audio_samples`."""
        defaults = {"sampling_rate": config.sampling_rate, "max_length": config.max_audio_samples}
        return cls(**(defaults | kwargs))

    @staticmethod
    def normalize(clip: np.ndarray) -> np.ndarray:
        """Zero mean, unit variance (a silent clip stays zero)."""
        clip = clip.astype(np.float32)
        return (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)

    def _to_clips(self, raw_speech: Any) -> list[np.ndarray]:
        """One clip or a batch (array, list of arrays or lists, torch tensors) -> a list of 1-D float arrays."""
        if hasattr(raw_speech, "detach") and hasattr(raw_speech, "cpu"):  # a torch tensor
            raw_speech = raw_speech.detach().cpu().numpy()
        if isinstance(raw_speech, np.ndarray):
            if raw_speech.ndim == 1:
                clips = [raw_speech]
            elif raw_speech.ndim == 2:
                clips = list(raw_speech)
            else:
                raise ValueError(
                    f"raw_speech must be one mono clip (samples,) or a batch (batch, samples), got an array of shape "
                    f"{raw_speech.shape}; average the channels of multi-channel audio first"
                )
        elif isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) == 0:
                raise ValueError("raw_speech is empty: give at least one clip")
            is_batch = not np.isscalar(raw_speech[0])
            clips = list(raw_speech) if is_batch else [raw_speech]
        else:
            raise ValueError(
                f"raw_speech must be a NumPy array, a torch tensor or a list of them, got {type(raw_speech).__name__}"
            )
        arrays = []
        for i, clip in enumerate(clips):
            if hasattr(clip, "detach") and hasattr(clip, "cpu"):
                clip = clip.detach().cpu().numpy()
            array = np.asarray(clip)
            if array.ndim != 1:
                raise ValueError(
                    f"clip {i} must be mono audio of shape (samples,), got shape {array.shape}; average the channels "
                    "of multi-channel audio first"
                )
            if array.size == 0:
                raise ValueError(f"clip {i} is empty")
            if not np.issubdtype(array.dtype, np.number):
                raise ValueError(f"clip {i} must hold numbers, got dtype {array.dtype}")
            arrays.append(array.astype(np.float32))
        return arrays

    def __call__(
        self,
        raw_speech: np.ndarray | Sequence[float] | Sequence[np.ndarray] | Any,
        sampling_rate: int | None = None,
        padding: bool | str | PaddingStrategy = "longest",
        max_length: int | None = None,
        truncation: bool | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
        do_normalize: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Featurize one clip or a batch of clips.

        Args:
            raw_speech: a mono clip `(samples,)`, a batch `(batch, samples)`, or a list of clips of any lengths
                (NumPy arrays, lists of floats or torch tensors).
            sampling_rate: the clips' sampling rate; must equal `self.sampling_rate` (strongly recommended: without
                it a wrong rate goes unnoticed).
            padding: `"longest"` (default), `"max_length"` or `False` (see `SequenceFeatureExtractor.pad`).
            max_length: truncation/padding length (default: `self.max_length`).
            truncation: cut clips longer than `max_length` (default: `True` when there is a `max_length`).
            pad_to_multiple_of: pad the length to a multiple of this.
            return_attention_mask: default `self.return_attention_mask`.
            return_tensors: `"pt"`, `"np"` or `None` (lists of arrays).
            do_normalize: default `self.do_normalize`.

        Returns:
            `BatchFeature` with `input_values` `(B, T)` float32 and `attention_mask` `(B, T)`.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)} for {self.__class__.__name__}")
        if sampling_rate is not None:
            if sampling_rate != self.sampling_rate:
                raise ValueError(
                    f"sampling_rate ({sampling_rate}) differs from the {self.sampling_rate} Hz this feature extractor "
                    f"(and its model) expects; resample the audio to {self.sampling_rate} Hz first"
                )
        else:
            logger.warning_once(
                f"Pass sampling_rate to {self.__class__.__name__}() (the model expects {self.sampling_rate} Hz): "
                "audio at another rate would be misread silently."
            )
        clips = self._to_clips(raw_speech)
        max_length = max_length if max_length is not None else self.max_length
        if truncation is None:
            truncation = max_length is not None
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs a max_length (argument or feature extractor setting)")
            # Cut before normalising, so the statistics are those of what the model sees.
            clips = [clip[:max_length] for clip in clips]
        if do_normalize if do_normalize is not None else self.do_normalize:
            clips = [self.normalize(clip) for clip in clips]
        padded = self.pad(
            BatchFeature({"input_values": clips}),
            padding=padding,
            max_length=max_length,
            truncation=False,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask if return_attention_mask is not None else None,
        )
        padded["input_values"] = [np.asarray(clip, dtype=np.float32) for clip in padded["input_values"]]
        if "attention_mask" in padded:
            padded["attention_mask"] = [np.asarray(mask, dtype=np.int32) for mask in padded["attention_mask"]]
        if return_tensors is not None:
            padded = padded.convert_to_tensors(return_tensors)
        return padded
