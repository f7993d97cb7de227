"""The tiny-config tester shared by the model tests: one `HeadSpec` per Perceiver head class.

Every test that is parametrized over `HEAD_SPECS` runs for every head, so a new head class is tested
by adding one `HeadSpec` here (`test_every_head_has_a_spec` fails until it is added). The configs are
tiny (hidden size 16, 1-2 layers) so that the whole suite stays fast on a 2-core CPU.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import perceiver_hf
from perceiver_hf import (
    AutoModelForMultimodalAutoencoding,
    AutoModelForMultimodalClassification,
    AutoModelForOpticalFlow,
    PerceiverConfig,
    PerceiverForAudioClassification,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForMultimodalAutoencoding,
    PerceiverForMultimodalClassification,
    PerceiverForOpticalFlow,
    PerceiverForSequenceClassification,
    PerceiverModel,
    PerceiverPreTrainedModel,
)

PAD_TOKEN_ID = 0
NUM_LABELS = 3


def tiny_text_config(**overrides: Any) -> PerceiverConfig:
    """A text config small enough to run in milliseconds, with query-key width != value width so the
    non-flash SDPA path and the eager path are both exercised."""
    kwargs: dict[str, Any] = dict(
        input_adapter="text",
        vocab_size=41,
        max_position_embeddings=12,
        d_model=16,
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
        self_attention_qk_channels=8,
        cross_attention_qk_channels=8,
        num_decoder_heads=2,
        num_labels=NUM_LABELS,
        pad_token_id=PAD_TOKEN_ID,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def tiny_image_config(**overrides: Any) -> PerceiverConfig:
    """An image config on 6x5 three-channel images (non-square, to catch height/width mix-ups)."""
    kwargs: dict[str, Any] = dict(
        input_adapter="image",
        image_size=[6, 5],
        num_channels=3,
        num_frequency_bands=3,
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
        self_attention_v_channels=8,
        num_decoder_heads=2,
        num_labels=NUM_LABELS,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def text_batch(
    config: PerceiverConfig, lengths: list[int], seq_len: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids `(B, seq_len)` with row `i` holding `lengths[i]` real tokens followed by padding.

    Real tokens avoid the pad id, so a test can tell real and padded positions apart by value too.
    """
    seq_len = seq_len or max(lengths)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (len(lengths), seq_len), generator=generator)
    attention_mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id or 0)
    return input_ids, attention_mask


def image_batch(config: PerceiverConfig, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Random channels-first `pixel_values` `(B, C, H, W)`, as transformers' image processors produce."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, config.num_channels, *config.image_size, generator=generator)


def select_rows(inputs: Any, rows: slice) -> Any:
    """The same rows of every tensor in a (possibly nested) dict of model inputs."""
    if isinstance(inputs, dict):
        return {key: select_rows(value, rows) for key, value in inputs.items()}
    return inputs[rows]


@dataclass(frozen=True)
class HeadSpec:
    """How to build, feed and check one head class.

    Attributes:
        model_class: the head class.
        auto_class: the transformers Auto class that must resolve the config to `model_class`.
        make_config: builds a tiny config for the head.
        output_name: the attribute of the output that holds the head's main result.
        output_shape: expected shape of that result for a batch `(B, N)` (`N` ignored for images).
        make_labels: builds `labels` for the inputs, or `None` for a head without a loss.
        variant: names a second configuration of a head already listed (its test ids then differ).
    """

    model_class: type[PerceiverPreTrainedModel]
    auto_class: type
    make_config: Callable[..., PerceiverConfig]
    output_name: str
    output_shape: Callable[[PerceiverConfig, int, int], tuple[int, ...]]
    make_labels: Callable[[PerceiverConfig, dict[str, torch.Tensor]], torch.Tensor] | None = None
    # Inputs of heads that take neither token ids nor images: (config, lengths, seq_len, seed) -> model inputs.
    make_inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    variant: str | None = None

    @property
    def id(self) -> str:
        return self.model_class.__name__ + (f"[{self.variant}]" if self.variant else "")

    @property
    def is_text(self) -> bool:
        return self.model_class.main_input_name == "input_ids"

    @property
    def position_wise(self) -> bool:
        """Whether the main output has one entry per input position (then padding adds entries)."""
        return self.model_class is PerceiverForMaskedLM

    def build(self, seed: int = 0, **config_overrides: Any) -> PerceiverPreTrainedModel:
        """A freshly initialised model in eval mode (seeded, so two builds have the same weights)."""
        torch.manual_seed(seed)
        return self.model_class(self.make_config(**config_overrides)).eval()

    def inputs(
        self, config: PerceiverConfig, lengths: list[int], seq_len: int | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Model inputs for `len(lengths)` examples; text rows are padded after `lengths[i]` tokens."""
        if self.make_inputs is not None:
            return self.make_inputs(config, lengths, seq_len, seed)
        if self.is_text:
            input_ids, attention_mask = text_batch(config, lengths, seq_len, seed)
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"pixel_values": image_batch(config, len(lengths), seed)}

    def labels(self, config: PerceiverConfig, inputs: dict[str, Any]) -> torch.Tensor | None:
        return None if self.make_labels is None else self.make_labels(config, inputs)

    def main_output(self, outputs: Any) -> torch.Tensor:
        return getattr(outputs, self.output_name)

    def scalar_loss(self, outputs: Any) -> torch.Tensor:
        """The head's loss, or for a head without one a loss-like function of every output value."""
        if getattr(outputs, "loss", None) is not None:
            return outputs.loss
        return self.main_output(outputs).square().mean()


def _mlm_labels(config: PerceiverConfig, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # Label every third real position (as a masking collator would pick a subset), -100 elsewhere.
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.full_like(input_ids, -100)
    picked = (torch.arange(input_ids.shape[1]) % 3 == 1)[None, :] & attention_mask.bool()
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(1, config.vocab_size, input_ids.shape, generator=generator)
    return torch.where(picked, targets, labels)


def _class_labels(config: PerceiverConfig, inputs: dict[str, Any]) -> torch.Tensor:
    first = next(iter(inputs.values()))
    batch_size = (next(iter(first.values())) if isinstance(first, dict) else first).shape[0]
    return torch.arange(batch_size) % config.num_labels


HEAD_SPECS: list[HeadSpec] = [
    HeadSpec(
        PerceiverModel,
        AutoModel,
        tiny_text_config,
        output_name="last_hidden_state",
        output_shape=lambda c, b, n: (b, c.num_latents, c.d_latents),
    ),
    HeadSpec(
        PerceiverForMaskedLM,
        AutoModelForMaskedLM,
        tiny_text_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, n, c.vocab_size),
        make_labels=_mlm_labels,
    ),
    HeadSpec(
        PerceiverForSequenceClassification,
        AutoModelForSequenceClassification,
        tiny_text_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, c.num_labels),
        make_labels=_class_labels,
    ),
    HeadSpec(
        PerceiverForImageClassification,
        AutoModelForImageClassification,
        tiny_image_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, c.num_labels),
        make_labels=_class_labels,
    ),
    # lucidrains' Perceiver classifier: the mean of the latents, LayerNorm and a linear layer (no decoder).
    HeadSpec(
        PerceiverForImageClassification,
        AutoModelForImageClassification,
        functools.partial(tiny_image_config, pooling="mean"),
        output_name="logits",
        output_shape=lambda c, b, n: (b, c.num_labels),
        make_labels=_class_labels,
        variant="mean-pooling",
    ),
    # The masked LM whose decoder queries are its inputs, with the text adapter's context convolution.
    HeadSpec(
        PerceiverForMaskedLM,
        AutoModelForMaskedLM,
        functools.partial(tiny_text_config, context_kernel_size=3, mlm_decoder_queries="inputs"),
        output_name="logits",
        output_shape=lambda c, b, n: (b, n, c.vocab_size),
        make_labels=_mlm_labels,
        variant="input-queries",
    ),
]


def tiny_audio_config(**overrides: Any) -> PerceiverConfig:
    """An audio config: 4-sample patches of waveforms of up to 64 samples (16 positions)."""
    kwargs: dict[str, Any] = dict(
        input_adapter="audio",
        max_audio_samples=64,
        audio_patch_size=4,
        num_frequency_bands=3,
        sampling_rate=8000,
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
        self_attention_qk_channels=8,
        num_decoder_heads=2,
        num_labels=NUM_LABELS,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def audio_batch(config: PerceiverConfig, lengths: list[int], seq_len: int | None = None, seed: int = 0):
    """Waveforms `(B, 4 * max(lengths))` (4 samples per length unit), row `i` real for `4 * lengths[i]` samples."""
    num_samples = 4 * (seq_len or max(lengths))
    generator = torch.Generator().manual_seed(seed)
    input_values = torch.randn(len(lengths), num_samples, generator=generator)
    attention_mask = torch.zeros(len(lengths), num_samples, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, : 4 * length] = 1
    return {"input_values": input_values * attention_mask, "attention_mask": attention_mask}


def tiny_multimodal_config(**overrides: Any) -> PerceiverConfig:
    """A two-modality config: 5x4 one-channel images and 1-axis audio of up to 48 samples in 4-sample patches."""
    kwargs: dict[str, Any] = dict(
        input_adapter="multimodal",
        modalities=[
            {"name": "image", "channels": 1, "num_axes": 2, "num_freq_bands": 2, "max_freq": 5.0},
            {
                "name": "audio",
                "channels": 1,
                "num_axes": 1,
                "num_freq_bands": 3,
                "max_freq": 12.0,
                "max_length": 48,
                "patch_size": 4,
            },
        ],  # fmt: skip
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
        self_attention_v_channels=8,
        num_decoder_heads=2,
        num_labels=NUM_LABELS,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def multimodal_batch(config: PerceiverConfig, lengths: list[int], seq_len: int | None = None, seed: int = 0):
    """Channels-first images and padded audio (as `PerceiverProcessor` returns them), keyed by modality name."""
    audio = audio_batch(config, lengths, seq_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    image = torch.randn(len(lengths), 1, 5, 4, generator=generator)
    return {"image": image, "audio": audio["input_values"], "audio_mask": audio["attention_mask"]}


HEAD_SPECS += [
    HeadSpec(
        PerceiverForAudioClassification,
        AutoModelForAudioClassification,
        tiny_audio_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, c.num_labels),
        make_labels=_class_labels,
        make_inputs=audio_batch,
    ),
    HeadSpec(
        PerceiverForMultimodalClassification,
        AutoModelForMultimodalClassification,
        tiny_multimodal_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, c.num_labels),
        make_labels=_class_labels,
        make_inputs=multimodal_batch,
    ),
]

FLOW_SIZE = (6, 8)  # frame size of the tiny optical flow config


def tiny_flow_config(**overrides: Any) -> PerceiverConfig:
    """An optical flow config: 3 x 3 patches of two 6 x 8 frames, projected to 8 channels, 2 Fourier bands."""
    kwargs: dict[str, Any] = dict(
        input_adapter="flow",
        flow_image_size=list(FLOW_SIZE),
        num_frequency_bands=2,
        flow_projection_channels=8,
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def flow_batch(config: PerceiverConfig, lengths: list[int], seq_len: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Frame pairs `(B, 2, 3, 6, 8)` (as `PerceiverOpticalFlowProcessor` returns them); no padding."""
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(len(lengths), 2, 3, *FLOW_SIZE, generator=generator)}


def _flow_labels(config: PerceiverConfig, inputs: dict[str, Any]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(inputs["pixel_values"].shape[0], *FLOW_SIZE, 2, generator=generator)


HEAD_SPECS += [
    HeadSpec(
        PerceiverForOpticalFlow,
        AutoModelForOpticalFlow,
        tiny_flow_config,
        output_name="logits",
        output_shape=lambda c, b, n: (b, *FLOW_SIZE, 2),
        make_labels=_flow_labels,
        make_inputs=flow_batch,
    ),
]


def tiny_autoencoding_config(**overrides: Any) -> PerceiverConfig:
    """A multimodal autoencoding config: one-frame 4 x 4 videos in 2 x 2 patches, audio in patches of 4 samples (up
    to 12), a one-hot label with a mask token; each reconstructed."""
    kwargs: dict[str, Any] = dict(
        input_adapter="multimodal",
        modalities=[
            {
                "name": "image",
                "channels": 1,
                "num_axes": 3,
                "num_freq_bands": 2,
                "max_freq": [1, 4, 4],
                "patch_size": [1, 2, 2],
            },
            {
                "name": "audio",
                "channels": 1,
                "num_axes": 1,
                "num_freq_bands": 2,
                "max_freq": 12.0,
                "patch_size": 4,
                "max_length": 12,
            },
            {
                "name": "label",
                "channels": 3,
                "num_axes": 1,
                "num_freq_bands": 0,
                "max_freq": 1.0,
                "one_hot": True,
                "mask_token": True,
            },
        ],
        modality_encoding="concat",
        modality_padding=2,
        autoencoding_outputs=[
            {"name": "image", "shape": [1, 4, 4]},
            {"name": "audio", "shape": [12], "patch_size": 4},
            {"name": "label", "query_channels": 6},
        ],
        autoencoding_output_channels=12,
        num_latents=6,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=2,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


def autoencoding_batch(config: PerceiverConfig, lengths: list[int], seq_len: int | None, seed: int):
    """One-frame channels-last videos, audio of 12 samples with `audio_mask` (the first `lengths[i]` samples real, at
    most 12), label ids; as keywords, as `PerceiverMultimodalAutoencodingProcessor` returns them."""
    generator = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths).clamp(max=12)[:, None]).long()
    return {
        "image": torch.rand(b, 1, 4, 4, 1, generator=generator),
        "audio": torch.randn(b, 12, generator=generator) * mask,
        "audio_mask": mask,
        "label": torch.arange(b) % 3,
    }


# The autoencoder's reconstructions are per-modality dicts: the tester compares its tensor output, the decoder's
# output for every point (16 image pixels, 3 audio patches, 1 label query). Its labels are a dict of targets too,
# which the tester's table-based Trainer tests cannot hold: no `make_labels` here;
# tests/test_multimodal_autoencoding.py checks the loss and trains the head with Trainer.
HEAD_SPECS += [
    HeadSpec(
        PerceiverForMultimodalAutoencoding,
        AutoModelForMultimodalAutoencoding,
        tiny_autoencoding_config,
        output_name="decoder_output",
        output_shape=lambda c, b, n: (b, 16 + 3 + 1, c.autoencoding_output_channels),
        make_inputs=autoencoding_batch,
    ),
]

TEXT_HEAD_SPECS = [spec for spec in HEAD_SPECS if spec.is_text]


def exported_head_classes() -> set[type[PerceiverPreTrainedModel]]:
    """Every concrete model class the package exports (subclasses of `PerceiverPreTrainedModel`)."""
    exported = (getattr(perceiver_hf, name) for name in perceiver_hf.__all__)
    return {
        obj
        for obj in exported
        if isinstance(obj, type) and issubclass(obj, PerceiverPreTrainedModel) and obj is not PerceiverPreTrainedModel
    }


def spec_ids(specs: list[HeadSpec]) -> list[str]:
    return [spec.id for spec in specs]


def sys_path_without_the_package() -> list[str]:
    """This interpreter's import path minus every entry that holds `perceiver_hf` (repository root,
    legacy `develop` install). Editable installs that hook in through a `.pth` file (import finders)
    are left out by running the child with `-S`, which skips `.pth` processing.

    Dynamic-module caches are left out too: transformers (and evaluate) append this process's
    `HF_MODULES_CACHE` to `sys.path` once they have used it, and where that cache holds a
    `transformers_modules` package (remote code loaded earlier, by any process), the child would import
    that package instead of the one in its own cache, which transformers appends after it: "No module
    named 'transformers_modules.model'", depending on which tests ran before."""
    from transformers.utils.hub import HF_MODULES_CACHE

    def excluded(entry: str) -> bool:
        path = Path(entry)
        return (
            (path / "perceiver_hf").exists()
            or (path / "transformers_modules").exists()
            or os.path.realpath(entry) == os.path.realpath(HF_MODULES_CACHE)
        )

    return [entry for entry in sys.path if entry and not excluded(entry)]
