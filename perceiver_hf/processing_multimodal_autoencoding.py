"""Processor of the multimodal autoencoder: raw frames, waveforms and labels <-> `PerceiverForMultimodalAutoencoding`.

`PerceiverMultimodalAutoencodingProcessor(...)(videos=..., audio=..., labels=...)` returns the model's keyword inputs,
one per modality (`{"image": ..., "audio": ..., "label": ...}`; with `return_targets=True` also `labels`, the same
tensors as reconstruction targets); `post_process(outputs)` turns
the model's reconstructions back into uint8 frames, waveforms in [-1, 1] and predicted label ids. Saved and loaded
like a feature extractor (`preprocessor_config.json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin

__all__ = ["PerceiverMultimodalAutoencodingProcessor"]


class PerceiverMultimodalAutoencodingProcessor(FeatureExtractionMixin):
    """Raw video frames, waveforms and labels -> the autoencoder's `inputs`; reconstructions -> frames and waveforms.

    Args:
        video_modality / audio_modality / label_modality: the model's modality names (DeepMind's: "image",
            "audio", "label"); `None` for a modality the model lacks.
        num_frames: frames per video (an image is a one-frame video); videos must have exactly this many.
        image_size: `(height, width)` of the frames; frames must have it (no resizing here).
        num_channels: channels per pixel (1: grayscale; RGB frames are averaged).
        num_audio_samples: samples per clip: shorter clips are zero-padded at the end, longer ones cut.
        sampling_rate: the audio's sampling rate (checked against the one given with the audio).
        normalize_audio: scale each clip to a peak of `audio_peak` (quiet recordings reconstruct as well as loud
            ones); `post_process` does not undo it.
        num_labels: classes of the label modality.
    """

    model_input_names = ["image", "audio", "label"]

    def __init__(
        self,
        video_modality: str | None = "image",
        audio_modality: str | None = "audio",
        label_modality: str | None = "label",
        num_frames: int = 1,
        image_size: Sequence[int] = (28, 28),
        num_channels: int = 1,
        num_audio_samples: int = 8000,
        sampling_rate: int = 8000,
        normalize_audio: bool = True,
        audio_peak: float = 0.9,
        num_labels: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.video_modality = video_modality
        self.audio_modality = audio_modality
        self.label_modality = label_modality
        self.num_frames = int(num_frames)
        self.image_size = [int(n) for n in image_size]
        self.num_channels = int(num_channels)
        self.num_audio_samples = int(num_audio_samples)
        self.sampling_rate = int(sampling_rate)
        self.normalize_audio = bool(normalize_audio)
        self.audio_peak = float(audio_peak)
        self.num_labels = int(num_labels)

    # ------------------------------------------------------------------------------------------ raw -> model

    def _frames(self, video: Any, index: int) -> np.ndarray:
        """One video (or image) -> float32 `(T, H, W, C)` in [0, 1]."""
        array = np.asarray(video)
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        array = array.astype(np.float32) / scale
        h, w = self.image_size
        if array.ndim == 2:  # (H, W) grayscale image
            array = array[None, :, :, None]
        elif array.ndim == 3:  # one frame (H, W, C), or T grayscale frames (T, H, W)
            array = array[None] if array.shape[:2] == (h, w) else array[..., None]
        if array.ndim != 4 or array.shape[1:3] != (h, w):
            raise ValueError(
                f"videos[{index}] must be frames of {h}x{w} pixels: (T, {h}, {w}, C), ({h}, {w}, C) or ({h}, {w}), "
                f"got shape {np.asarray(video).shape}"
            )
        if array.shape[0] != self.num_frames:
            raise ValueError(f"videos[{index}] must have {self.num_frames} frames, got {array.shape[0]}")
        if array.shape[-1] != self.num_channels:
            if self.num_channels == 1:
                array = array.mean(axis=-1, keepdims=True)  # RGB -> gray
            else:
                raise ValueError(f"videos[{index}] must have {self.num_channels} channels, got {array.shape[-1]}")
        return array

    def _clip(self, clip: Any, index: int) -> np.ndarray:
        wave = np.asarray(clip, dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=-1)  # (samples, channels) -> mono
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"audio[{index}] must be a non-empty waveform (samples,), got shape {np.shape(clip)}")
        wave = wave[: self.num_audio_samples]
        if self.normalize_audio:
            peak = float(np.abs(wave).max())
            if peak > 0:
                wave = wave * (self.audio_peak / peak)
        return np.pad(wave, (0, self.num_audio_samples - wave.size))

    def __call__(
        self,
        videos: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        labels: Sequence[int] | None = None,
        sampling_rate: int | None = None,
        images: Sequence[Any] | None = None,
        return_targets: bool = False,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """
        Args:
            videos: frames per example, `(T, H, W, C)` (uint8 or floats in [0, 1]); `images`: one frame each.
            audio: waveforms per example, `(samples,)` (or `(samples, channels)`, averaged to mono).
            labels: class ids; left out, the model masks the label and predicts it.
            sampling_rate: the audio's rate, checked against the processor's.
            return_targets: also return `labels`, the reconstruction targets (the inputs themselves).
        """
        if videos is not None and images is not None:
            raise ValueError("give videos or images, not both")
        if images is not None:
            videos = [np.asarray(image)[None] if np.asarray(image).ndim == 3 else np.asarray(image) for image in images]
        inputs: dict[str, torch.Tensor] = {}
        if videos is not None:
            if self.video_modality is None:
                raise ValueError("this processor has no video modality (video_modality=None)")
            inputs[self.video_modality] = torch.from_numpy(np.stack([self._frames(v, i) for i, v in enumerate(videos)]))
        if audio is not None:
            if self.audio_modality is None:
                raise ValueError("this processor has no audio modality (audio_modality=None)")
            if sampling_rate is not None and sampling_rate != self.sampling_rate:
                raise ValueError(
                    f"sampling_rate ({sampling_rate}) differs from the processor's ({self.sampling_rate}); "
                    "resample first"
                )
            inputs[self.audio_modality] = torch.from_numpy(np.stack([self._clip(c, i) for i, c in enumerate(audio)]))
        if labels is not None:
            if self.label_modality is None:
                raise ValueError("this processor has no label modality (label_modality=None)")
            ids = torch.as_tensor(list(labels), dtype=torch.long)
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_labels):
                raise ValueError(f"labels must be class ids in [0, {self.num_labels}), got {ids.tolist()}")
            inputs[self.label_modality] = ids
        if not inputs:
            raise ValueError("give at least one of videos / images, audio and labels")
        sizes = {name: value.shape[0] for name, value in inputs.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every modality needs one entry per example, got {sizes}")
        data: dict[str, Any] = dict(inputs)
        if return_targets:
            data["labels"] = dict(inputs)
        return BatchFeature(data)

    # ------------------------------------------------------------------------------------------ model -> raw

    def post_process(self, reconstructions: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The model's `reconstructions` (or `reconstruct(...)`'s) -> `{video: uint8 (B, T, H, W, C), audio: float32
        (B, samples) in [-1, 1], label: int64 (B,) predicted ids}` for the modalities present."""
        out = {}
        if self.video_modality in reconstructions:
            frames = reconstructions[self.video_modality].detach().float().clamp(0, 1)
            out[self.video_modality] = (frames * 255).round().to(torch.uint8).cpu().numpy()
        if self.audio_modality in reconstructions:
            out[self.audio_modality] = reconstructions[self.audio_modality].detach().float().clamp(-1, 1).cpu().numpy()
        if self.label_modality in reconstructions:
            out[self.label_modality] = reconstructions[self.label_modality].argmax(-1).cpu().numpy()
        return out
