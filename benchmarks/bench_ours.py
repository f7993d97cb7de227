"""This package (`perceiver_hf`), built to match each peer's architecture."""

from __future__ import annotations

import torch
from common import Architecture, Runner, Workload

NAME = "perceiver_hf"
PEER_OF = ("gelu", "geglu")


def unavailable() -> str | None:
    try:
        import perceiver_hf  # noqa: F401
    except ImportError as error:
        return f"perceiver_hf is not importable ({error}): run from the repository root or `pip install -e .`"
    return None


def config_fields(workload: Workload, arch: Architecture) -> dict:
    """`PerceiverConfig` fields of the matched architecture (see `common.Architecture`)."""
    fields = dict(
        num_latents=arch.num_latents,
        d_latents=arch.d_latents,
        num_cross_attention_layers=1,
        num_self_attention_blocks=1,
        num_self_attention_layers_per_block=arch.num_self_attention_layers,
        num_cross_attention_heads=arch.num_heads,
        num_self_attention_heads=arch.num_heads,
        cross_attention_qk_channels=arch.d_latents,
        cross_attention_v_channels=arch.d_latents,
        self_attention_qk_channels=arch.d_latents,
        self_attention_v_channels=arch.d_latents,
        cross_attention_widening_factor=arch.widening_factor,
        self_attention_widening_factor=arch.widening_factor,
        hidden_act=arch.mlp,
        decoder_widening_factor=1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    lucidrains = arch.mlp == "geglu"
    if lucidrains:
        # lucidrains' blocks exactly: no query/key/value biases, and a decoder cross-attention without an MLP.
        fields |= dict(qkv_bias=False, decoder_use_mlp=False)
    if workload.task == "mlm":
        fields |= dict(
            input_adapter="text",
            vocab_size=arch.vocab_size,
            max_position_embeddings=workload.seq_len,
            d_model=arch.d_model,
            # transformers' decoder: 8 heads, 256 query-key channels; lucidrains' reuses the encoder's widths
            num_decoder_heads=arch.num_heads if lucidrains else arch.mlm_decoder_heads,
            decoder_qk_channels=arch.d_model if lucidrains else arch.mlm_decoder_qk_channels,
            decoder_v_channels=arch.d_model,
            decoder_use_query_residual=False,
            tie_word_embeddings=not lucidrains,  # lucidrains' PerceiverLM has its own output projection
            # lucidrains' decoder queries are the embedded inputs (token + position), with no query residual.
            mlm_decoder_queries="inputs" if lucidrains else "positions",
            decode_masked_only=True,
        )
    else:
        h, w, c = workload.image_shape
        fields |= dict(
            input_adapter="image",
            image_size=[h, w],
            num_channels=c,
            num_frequency_bands=workload.num_frequency_bands,
            num_labels=workload.num_classes,
            num_decoder_heads=1,
            decoder_use_query_residual=True,
            num_output_queries=1,
            d_output_queries=arch.d_latents,
            pooling="mean" if lucidrains else "decoder",  # lucidrains' Perceiver mean-pools the latents
        )
    return fields


def build(workload: Workload, arch: Architecture, **overrides) -> Runner:
    from perceiver_hf import PerceiverConfig, PerceiverForImageClassification, PerceiverForMaskedLM

    config = PerceiverConfig(**(config_fields(workload, arch) | overrides))

    if workload.task == "mlm":
        model = PerceiverForMaskedLM(config)
        return Runner(
            model=model,
            train_loss=lambda batch: model(input_ids=batch["input_ids"], labels=batch["labels"]).loss,
            infer=lambda batch: model(input_ids=batch["input_ids"]).logits,
            notes=["decodes only the masked positions in training (config.decode_masked_only)"],
        )
    model = PerceiverForImageClassification(config)
    return Runner(
        model=model,
        train_loss=lambda batch: model(pixel_values=batch["images"], labels=batch["labels"]).loss,
        infer=lambda batch: model(pixel_values=batch["images"]).logits,
    )


def build_encoder(workload: Workload, arch: Architecture) -> torch.nn.Module:
    """The encoder with its input adapter (`PerceiverModel`), for the `torch.compile` check."""
    from perceiver_hf import PerceiverConfig, PerceiverModel

    return PerceiverModel(PerceiverConfig(**config_fields(workload, arch)))
