"""krasserm's `perceiver-io` 0.11 (PyPI `perceiver-io`, import name `perceiver`).

Only the PyTorch model code is imported: the packages `perceiver.model.text.mlm` and
`perceiver.model.vision.image_classifier` import PyTorch Lightning and transformers 4 wrappers in their
`__init__`, which the models do not need, so their `backend` modules are loaded without running it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch.nn.functional as F
from common import Architecture, Runner, Workload

NAME = "krasserm"
PEER_OF = ("gelu",)
INSTALL = (
    "pip install -c constraints.txt --no-deps --ignore-requires-python perceiver-io==0.11.0 "
    "&& pip install -c constraints.txt --no-deps --no-build-isolation fairscale==0.4.13 "
    "&& pip install -c constraints.txt einops"
)


def _backend(package: str, parent: str):
    """Import `package.backend` without executing `package/__init__.py`."""
    if package not in sys.modules:
        parent_module = importlib.import_module(parent)
        stub = types.ModuleType(package)
        stub.__path__ = [os.path.join(os.path.dirname(parent_module.__file__), package.rsplit(".", 1)[1])]
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.backend")


def unavailable() -> str | None:
    try:
        _backend("perceiver.model.text.mlm", "perceiver.model.text")
        _backend("perceiver.model.vision.image_classifier", "perceiver.model.vision")
    except ImportError as error:
        return f"perceiver-io is not importable ({error}); install: {INSTALL}"
    return None


def build(workload: Workload, arch: Architecture) -> Runner:
    if arch.mlp != "gelu":
        raise ValueError(f"perceiver-io has a GELU MLP only, not {arch.mlp!r}")
    encoder_fields = dict(
        num_cross_attention_heads=arch.num_heads,
        num_cross_attention_qk_channels=arch.d_latents,
        num_cross_attention_v_channels=arch.d_latents,
        num_cross_attention_layers=1,
        cross_attention_widening_factor=arch.widening_factor,
        num_self_attention_heads=arch.num_heads,
        num_self_attention_qk_channels=arch.d_latents,
        num_self_attention_v_channels=arch.d_latents,
        num_self_attention_layers_per_block=arch.num_self_attention_layers,
        num_self_attention_blocks=1,
        self_attention_widening_factor=arch.widening_factor,
        dropout=0.0,
    )
    if workload.task == "mlm":
        mlm = _backend("perceiver.model.text.mlm", "perceiver.model.text")
        from perceiver.model.text.common import TextEncoderConfig

        config = mlm.MaskedLanguageModelConfig(
            encoder=TextEncoderConfig(
                vocab_size=arch.vocab_size,
                max_seq_len=workload.seq_len,
                num_input_channels=arch.d_model,
                **encoder_fields,
            ),
            decoder=mlm.TextDecoderConfig(
                num_cross_attention_heads=arch.mlm_decoder_heads,
                num_cross_attention_qk_channels=arch.mlm_decoder_qk_channels,
                num_cross_attention_v_channels=arch.d_model,
                cross_attention_widening_factor=1,
                cross_attention_residual=False,
                vocab_size=arch.vocab_size,
                max_seq_len=workload.seq_len,
                num_output_query_channels=None,  # queries of the embedding width, output tied to the embedding
            ),
            num_latents=arch.num_latents,
            num_latent_channels=arch.d_latents,
        )
        model = mlm.MaskedLanguageModel(config)

        def mlm_loss(batch):
            logits = model(batch["input_ids"])  # (B, N, V)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

        return Runner(
            model=model,
            train_loss=mlm_loss,
            infer=lambda batch: model(batch["input_ids"]),
            notes=["decodes every position"],
        )

    vision = _backend("perceiver.model.vision.image_classifier", "perceiver.model.vision")
    from perceiver.model.core import ClassificationDecoderConfig

    config = vision.ImageClassifierConfig(
        encoder=vision.ImageEncoderConfig(
            image_shape=workload.image_shape, num_frequency_bands=workload.num_frequency_bands, **encoder_fields
        ),
        decoder=ClassificationDecoderConfig(
            num_cross_attention_heads=1,
            num_output_query_channels=arch.d_latents,
            num_classes=workload.num_classes,
            cross_attention_residual=True,
        ),
        num_latents=arch.num_latents,
        num_latent_channels=arch.d_latents,
    )
    model = vision.ImageClassifier(config)
    return Runner(
        model=model,
        train_loss=lambda batch: F.cross_entropy(model(batch["images"]), batch["labels"]),
        infer=lambda batch: model(batch["images"]),
    )
