"""transformers' own Perceiver: `PerceiverForMaskedLM`, and `PerceiverModel` with its image preprocessor
and classification decoder (what `PerceiverForImageClassificationFourier` builds, for any image shape)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import Architecture, Runner, Workload
from torch import nn

NAME = "transformers"
PEER_OF = ("gelu",)


def unavailable() -> str | None:
    try:
        from transformers import PerceiverForMaskedLM  # noqa: F401
    except ImportError as error:
        return f"transformers' Perceiver is not importable ({error})"
    return None


def _config(workload: Workload, arch: Architecture):
    from transformers import PerceiverConfig

    return PerceiverConfig(
        num_latents=arch.num_latents,
        d_latents=arch.d_latents,
        d_model=arch.d_model,
        num_blocks=1,
        num_self_attends_per_block=arch.num_self_attention_layers,
        num_self_attention_heads=arch.num_heads,
        num_cross_attention_heads=arch.num_heads,
        qk_channels=arch.d_latents,
        v_channels=arch.d_latents,
        cross_attention_widening_factor=arch.widening_factor,
        self_attention_widening_factor=arch.widening_factor,
        attention_probs_dropout_prob=0.0,
        vocab_size=arch.vocab_size,
        # its decoder always emits max_position_embeddings positions: make it the sequence length
        max_position_embeddings=max(workload.seq_len, 1),
        num_labels=max(workload.num_classes, 2),
    )


class _ImageClassifier(nn.Module):
    """`PerceiverModel` + pixels preprocessor with Fourier features + classification decoder."""

    def __init__(self, workload: Workload, arch: Architecture) -> None:
        super().__init__()
        from transformers.models.perceiver.modeling_perceiver import (
            PerceiverClassificationDecoder,
            PerceiverImagePreprocessor,
            PerceiverModel,
        )

        config = _config(workload, arch)
        h, w, c = workload.image_shape
        self.perceiver = PerceiverModel(
            config,
            input_preprocessor=PerceiverImagePreprocessor(
                config,
                prep_type="pixels",
                spatial_downsample=1,
                in_channels=c,
                fourier_position_encoding_kwargs=dict(
                    concat_pos=True, max_resolution=(h, w), num_bands=workload.num_frequency_bands, sine_only=False
                ),
            ),
            decoder=PerceiverClassificationDecoder(
                config,
                num_channels=config.d_latents,
                trainable_position_encoding_kwargs=dict(num_channels=config.d_latents, index_dims=1),
                use_query_residual=True,
            ),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.perceiver(inputs=pixel_values).logits


def build(workload: Workload, arch: Architecture) -> Runner:
    if arch.mlp != "gelu":
        raise ValueError(f"transformers' Perceiver has a GELU MLP only, not {arch.mlp!r}")
    if workload.task == "mlm":
        from transformers import PerceiverForMaskedLM

        model = PerceiverForMaskedLM(_config(workload, arch))
        return Runner(
            model=model,
            train_loss=lambda batch: model(inputs=batch["input_ids"], labels=batch["labels"]).loss,
            infer=lambda batch: model(inputs=batch["input_ids"]).logits,
            notes=["decodes every position (max_position_embeddings = sequence length)"],
        )
    model = _ImageClassifier(workload, arch)
    return Runner(
        model=model,
        # transformers' image preprocessor takes channels-first pixel_values; converted outside the timing
        prepare=lambda batch: batch | {"images": batch["images"].permute(0, 3, 1, 2).contiguous()},
        train_loss=lambda batch: F.cross_entropy(model(batch["images"]), batch["labels"]),
        infer=lambda batch: model(batch["images"]),
    )
