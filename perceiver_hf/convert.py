"""Convert transformers' own Perceiver models (DeepMind's checkpoints) into `perceiver_hf` models.

transformers hosts DeepMind's Perceiver IO checkpoints in its own format. This module maps such a model,
given as an object, a local directory or a Hub id, to the equivalent `perceiver_hf` model with the same
weights, so that logits agree to float precision and the model gains this package's capabilities (SDPA,
gradient checkpointing, inputs of any length up to the positions, decoding only the masked positions).

Supported transformers classes (and DeepMind's checkpoints of them):

- `PerceiverForMaskedLM` (`deepmind/language-perceiver`) -> `PerceiverForMaskedLM`, with transformers'
  byte-level `PerceiverTokenizer`;
- `PerceiverForImageClassificationLearned` (`deepmind/vision-perceiver-learned`: 1x1 convolution, learned
  positions projected by a linear layer) -> `PerceiverForImageClassification` with "pixels" preprocessing,
  `image_projection_channels`, `image_position_encoding="learned"` and `image_position_projection_channels`;
- `PerceiverForImageClassificationFourier` (`deepmind/vision-perceiver-fourier`: pixels and Fourier
  features) -> `PerceiverForImageClassification` with "pixels" preprocessing;
- `PerceiverForImageClassificationConvProcessing` (`deepmind/vision-perceiver-conv`: conv + max-pool stem,
  Fourier features of the 4x downsampled grid) -> `PerceiverForImageClassification` with "conv"
  preprocessing and `image_conv_padding="transformers"` (transformers pads the stem differently from
  DeepMind's TensorFlow "SAME" padding: 224 pixels give 55x55 positions, not 56x56; see `ConvDownsample`);
- `PerceiverForOpticalFlow` (`deepmind/optical-flow-perceiver`: 3 x 3 patches of two frames, a linear layer,
  Fourier features; the decoder queried by the input features) -> `PerceiverForOpticalFlow` (`input_adapter="flow"`),
  with a `PerceiverOpticalFlowProcessor` (frames to [-1, 1], tiles of the training size, flow x 20).
- `PerceiverForMultimodalAutoencoding` (`deepmind/multimodal-perceiver`: Kinetics video, audio and label) ->
  `PerceiverForMultimodalAutoencoding` (the multimodal adapter with `modality_encoding="concat"`, mask tokens and
  `autoencoding_outputs`), with a `PerceiverMultimodalAutoencodingProcessor`; reconstructions equal transformers' on
  the same subsampled output points.

The image classifiers come with a `PerceiverImageProcessor` that feeds them like transformers' own
processor does for DeepMind's ImageNet checkpoints: center crop of 224/256 of the shorter side, bicubic
resize to the configured image size, ImageNet mean and std.

Python:

```python
>>> from perceiver_hf.convert import convert_transformers_perceiver
>>> model, tokenizer_or_processor = convert_transformers_perceiver("deepmind/language-perceiver")
```

Command line (on a machine with internet for Hub ids):

```
python -m perceiver_hf.convert deepmind/language-perceiver ./language-perceiver
```

Kept apart from the modelling code: nothing here is imported by the models.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from .configuration_perceiver import PerceiverConfig
from .image_processing_perceiver import PerceiverImageProcessor, PILImageResampling  # (Pillow's, or a stand-in)
from .modeling_optical_flow import PerceiverForOpticalFlow
from .modeling_perceiver import (
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverPreTrainedModel,
)
from .processing_optical_flow import PerceiverOpticalFlowProcessor

__all__ = ["convert_transformers_perceiver", "ConversionError", "main"]


class ConversionError(ValueError):
    """A transformers Perceiver setting that `perceiver_hf` cannot represent exactly."""


def _load_transformers_model(model_or_path) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from transformers import AutoConfig
    from transformers import models as hf_models

    hf_config = AutoConfig.from_pretrained(model_or_path)
    architectures = hf_config.architectures or []
    if hf_config.model_type != "perceiver" or not architectures:
        raise ConversionError(
            f"{model_or_path!r} is not a transformers Perceiver model (model_type={hf_config.model_type!r}, "
            f"architectures={architectures})"
        )
    model_class = getattr(hf_models.perceiver, architectures[0], None)
    if model_class is None:
        raise ConversionError(f"unknown transformers Perceiver architecture {architectures[0]!r}")
    return model_class.from_pretrained(model_or_path)


def _require(condition: bool, setting: str, value, expected: str) -> None:
    if not condition:
        raise ConversionError(f"{setting}={value!r} cannot be represented in perceiver_hf: expected {expected}")


def _attention_widths(layer_prefix: str, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(qk_channels, v_channels) of a transformers `PerceiverLayer`, read off its weights."""
    return (
        state[f"{layer_prefix}.attention.self.query.weight"].shape[0],
        state[f"{layer_prefix}.attention.self.value.weight"].shape[0],
    )


def _layer_mapping(hf_prefix: str, our_prefix: str, cross_attention: bool) -> dict[str, str]:
    """Key mapping of one transformers `PerceiverLayer` onto our cross- or self-attention layer."""
    mapping = {
        "attention.self.query": "attention.q_proj",
        "attention.self.key": "attention.k_proj",
        "attention.self.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
        "layernorm": "mlp.norm",
        "mlp.dense1": "mlp.fc1",
        "mlp.dense2": "mlp.fc2",
    }
    if cross_attention:
        mapping |= {"attention.self.layernorm1": "q_norm", "attention.self.layernorm2": "kv_norm"}
    else:
        mapping |= {"attention.self.layernorm1": "norm"}
    return {
        f"{hf_prefix}.{hf}.{kind}": f"{our_prefix}.{ours}.{kind}"
        for hf, ours in mapping.items()
        for kind in ("weight", "bias")
    }


def _encoder_config_and_mapping(hf_model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    c = hf_model.config
    _require(c.hidden_act == "gelu", "hidden_act", c.hidden_act, "'gelu'")
    _require(getattr(c, "chunk_size_feed_forward", 0) in (0, None), "chunk_size_feed_forward",
             c.chunk_size_feed_forward, "0")  # fmt: skip
    cross_qk, cross_v = _attention_widths("perceiver.encoder.cross_attention", state)
    self_qk, self_v = _attention_widths("perceiver.encoder.self_attends.0", state)
    _require(self_v == c.d_latents, "v_channels", c.v_channels, f"the latent width d_latents={c.d_latents}")
    num_input_channels = state["perceiver.encoder.cross_attention.attention.self.key.weight"].shape[1]
    fields = dict(
        num_latents=c.num_latents,
        d_latents=c.d_latents,
        num_cross_attention_layers=1,
        num_self_attention_blocks=c.num_blocks,
        num_self_attention_layers_per_block=c.num_self_attends_per_block,
        first_self_attention_block_shared=True,
        num_cross_attention_heads=c.num_cross_attention_heads,
        num_self_attention_heads=c.num_self_attention_heads,
        cross_attention_qk_channels=cross_qk,
        cross_attention_v_channels=cross_v,
        self_attention_qk_channels=self_qk,
        self_attention_v_channels=self_v,
        cross_attention_widening_factor=c.cross_attention_widening_factor,
        self_attention_widening_factor=c.self_attention_widening_factor,
        use_query_residual=c.use_query_residual,
        hidden_act="gelu",
        dropout=0.0,
        attention_dropout=c.attention_probs_dropout_prob,
        # transformers builds every Perceiver LayerNorm with the default eps, not config.layer_norm_eps.
        layer_norm_eps=1e-5,
        initializer_range=c.initializer_range,
    )
    mapping = {"perceiver.embeddings.latents": "perceiver.encoder.latent"}
    mapping |= _layer_mapping("perceiver.encoder.cross_attention", "perceiver.encoder.cross_attention.0", True)
    for i in range(c.num_self_attends_per_block):
        mapping |= _layer_mapping(
            f"perceiver.encoder.self_attends.{i}", f"perceiver.encoder.self_attention.0_{i}", False
        )
    return fields | {"_num_input_channels": num_input_channels}, mapping


def _decoder_fields(decoder_prefix: str, decoder: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """The decoder fields of transformers' decoder module `decoder` (at `decoder_prefix` in `state`)."""
    layer = decoder.decoding_cross_attention.attention
    num_heads, residual = layer.self.num_heads, layer.use_query_residual
    layer_prefix = f"{decoder_prefix}.decoding_cross_attention"
    qk, v = _attention_widths(layer_prefix, state)
    hidden, width = state[f"{layer_prefix}.mlp.dense1.weight"].shape
    widening = hidden // width
    return dict(
        num_decoder_heads=num_heads,
        decoder_qk_channels=qk,
        decoder_v_channels=v,
        decoder_widening_factor=widening,
        decoder_use_query_residual=residual,
    )


def _convert_masked_lm(hf_model: nn.Module):
    from transformers import PerceiverTokenizer

    state = hf_model.state_dict()
    c = hf_model.config
    fields, mapping = _encoder_config_and_mapping(hf_model, state)
    fields.pop("_num_input_channels")
    fields |= _decoder_fields("perceiver.decoder", hf_model.perceiver.decoder, state)
    config = PerceiverConfig(
        input_adapter="text",
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        d_model=c.d_model,
        tie_word_embeddings=True,
        pad_token_id=getattr(c, "pad_token_id", None),
        **fields,
    )
    mapping |= {
        "perceiver.input_preprocessor.embeddings.weight": "perceiver.encoder.input_adapter.token_embedding.weight",
        "perceiver.input_preprocessor.position_embeddings.weight":
            "perceiver.encoder.input_adapter.position_embedding.weight",
        "perceiver.decoder.output_position_encodings.position_embeddings": "decoder.output_query",
        "embedding_decoder.bias": "decoder.output_adapter.linear.bias",
    }  # fmt: skip
    mapping |= _layer_mapping("perceiver.decoder.decoding_cross_attention", "decoder.cross_attention", True)
    model = PerceiverForMaskedLM(config)
    _load_mapped(model, state, mapping, tied={"decoder.output_adapter.linear.weight"})
    return model, PerceiverTokenizer(model_max_length=c.max_position_embeddings)


def _image_adapter_fields_and_mapping(hf_model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Config fields and weight mapping of transformers' `PerceiverImagePreprocessor` in the image classifiers:

    - "pixels" + Fourier features (`PerceiverForImageClassificationFourier`): "pixels";
    - "conv1x1" + learned positions, projected (`PerceiverForImageClassificationLearned`): "pixels" with a
      projection of the pixels and of the positions;
    - "conv" + Fourier features (`PerceiverForImageClassificationConvProcessing`): "conv" with transformers'
      padding of the stem (see `ConvDownsample`).

    `state` is updated in place where a weight needs reshaping.
    """
    preprocessor = hf_model.perceiver.input_preprocessor
    prep_type = preprocessor.prep_type
    _require(prep_type in ("pixels", "conv1x1", "conv"), "prep_type", prep_type, "'pixels', 'conv1x1' or 'conv'")
    _require(preprocessor.concat_or_add_pos == "concat", "concat_or_add_pos", preprocessor.concat_or_add_pos,
             "'concat'")  # fmt: skip
    hf = "perceiver.input_preprocessor"
    ours = "perceiver.encoder.input_adapter"
    mapping: dict[str, str] = {}

    position_encoding = preprocessor.position_embeddings
    if preprocessor.position_encoding_type == "fourier":
        _require(position_encoding.concat_pos and not position_encoding.sine_only, "fourier_position_encoding_kwargs",
                 {"concat_pos": position_encoding.concat_pos, "sine_only": position_encoding.sine_only},
                 "concat_pos=True, sine_only=False")  # fmt: skip
        max_resolution = tuple(position_encoding.max_resolution)
        _require(len(max_resolution) == 2 and len(set(max_resolution)) == 1, "max_resolution", max_resolution,
                 "equal height and width")  # fmt: skip
        fields = dict(
            image_position_encoding="fourier",
            num_frequency_bands=position_encoding.num_bands,
            max_frequency=float(max_resolution[0]),
        )
        # Fourier features fit any image size; the configured one (the image processor's) is the one the
        # frequencies were chosen for: the Fourier grid itself, 4x that for the conv stem (224 for 56).
        image_size = [max_resolution[0] * (4 if prep_type == "conv" else 1)] * 2
        num_position_channels = position_encoding.output_size()
    elif preprocessor.position_encoding_type == "trainable":
        _require(prep_type != "conv", "position_encoding_type", "trainable", "'fourier' with prep_type='conv'")
        num_positions, num_position_channels = position_encoding.position_embeddings.shape
        side = math.isqrt(num_positions)
        _require(side * side == num_positions, "trainable_position_encoding_kwargs",
                 {"index_dims": num_positions}, "a square number of positions (image_size**2)")  # fmt: skip
        fields = dict(image_position_encoding="learned", image_position_channels=num_position_channels)
        image_size = [side, side]
        mapping[f"{hf}.position_embeddings.position_embeddings"] = f"{ours}.position_encoding.weight"
    else:
        raise ConversionError(
            f"position_encoding_type={preprocessor.position_encoding_type!r} cannot be represented in perceiver_hf: "
            "expected 'fourier' or 'trainable'"
        )
    if isinstance(preprocessor.positions_projection, nn.Linear):
        fields["image_position_projection_channels"] = preprocessor.positions_projection.out_features
        num_position_channels = preprocessor.positions_projection.out_features
        for kind in ("weight", "bias"):
            mapping[f"{hf}.positions_projection.{kind}"] = f"{ours}.position_projection.{kind}"

    if prep_type == "pixels":
        _require(preprocessor.spatial_downsample == 1, "spatial_downsample", preprocessor.spatial_downsample, "1")
        num_input_channels = state["perceiver.encoder.cross_attention.attention.self.key.weight"].shape[1]
        fields |= dict(image_preprocessing="pixels", num_channels=num_input_channels - num_position_channels)
    elif prep_type == "conv1x1":
        # A 1x1 convolution of stride 1 is a linear projection of each pixel's channels.
        conv = preprocessor.convnet_1x1
        _require(conv.stride == (1, 1), "spatial_downsample", preprocessor.spatial_downsample, "1")
        state[f"{hf}.convnet_1x1.weight"] = state[f"{hf}.convnet_1x1.weight"].flatten(1)
        fields |= dict(
            image_preprocessing="pixels", num_channels=conv.in_channels, image_projection_channels=conv.out_channels
        )
        for kind in ("weight", "bias"):
            mapping[f"{hf}.convnet_1x1.{kind}"] = f"{ours}.projection.{kind}"
    else:  # "conv": transformers' Conv2DDownsample is one conv + max-pool layer, whatever its spatial_downsample
        stem = preprocessor.convnet
        batchnorm = stem.batchnorm
        _require(isinstance(batchnorm, nn.BatchNorm2d), "conv2d_use_batchnorm", False, "True")
        _require(batchnorm.eps == 1e-5 and batchnorm.affine and batchnorm.track_running_stats, "batchnorm",
                 {"eps": batchnorm.eps, "affine": batchnorm.affine,
                  "track_running_stats": batchnorm.track_running_stats},
                 "eps=1e-05, affine=True, track_running_stats=True")  # fmt: skip
        fields |= dict(
            image_preprocessing="conv",
            spatial_downsample=4,
            num_channels=stem.conv.in_channels,
            image_projection_channels=stem.conv.out_channels,
            image_conv_padding="transformers",
        )
        mapping[f"{hf}.convnet.conv.weight"] = f"{ours}.preprocessor.layers.0.conv.weight"
        for kind in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            mapping[f"{hf}.convnet.batchnorm.{kind}"] = f"{ours}.preprocessor.layers.0.batchnorm.{kind}"
    return fields | {"image_size": image_size}, mapping


def _convert_image_classifier(hf_model: nn.Module):
    state = dict(hf_model.state_dict())
    c = hf_model.config
    fields, mapping = _encoder_config_and_mapping(hf_model, state)
    fields.pop("_num_input_channels")
    image_fields, image_mapping = _image_adapter_fields_and_mapping(hf_model, state)
    fields |= _decoder_fields("perceiver.decoder.decoder", hf_model.perceiver.decoder.decoder, state)
    config = PerceiverConfig(
        input_adapter="image",
        num_labels=c.num_labels,
        id2label=dict(c.id2label),
        label2id=dict(c.label2id),
        num_output_queries=1,
        d_output_queries=hf_model.perceiver.decoder.decoder.num_channels,
        **image_fields,
        **fields,
    )
    mapping |= image_mapping
    mapping |= {
        "perceiver.decoder.decoder.output_position_encodings.position_embeddings":
            "classification_decoder.output_query",
        "perceiver.decoder.decoder.final_layer.weight": "classification_decoder.output_adapter.linear.weight",
        "perceiver.decoder.decoder.final_layer.bias": "classification_decoder.output_adapter.linear.bias",
    }  # fmt: skip
    mapping |= _layer_mapping(
        "perceiver.decoder.decoder.decoding_cross_attention", "classification_decoder.cross_attention", True
    )
    model = PerceiverForImageClassification(config)
    _load_mapped(model, state, mapping)
    # transformers' `PerceiverImageProcessor` defaults (DeepMind's ImageNet evaluation): keep the central
    # 224/256 of the shorter side, bicubic resize. The crop ratio stays 224/256 for any configured size.
    height, width = config.image_size
    image_processor = PerceiverImageProcessor.from_perceiver_config(
        config,
        do_center_crop=True,
        crop_size={"height": round(height * 256 / 224), "width": round(width * 256 / 224)},
        resample=PILImageResampling.BICUBIC,
    )
    return model, image_processor


def _convert_optical_flow(hf_model: nn.Module):
    """transformers' `PerceiverForOpticalFlow` (`deepmind/optical-flow-perceiver`) -> `PerceiverForOpticalFlow`.

    transformers' model takes the 3 x 3 patches of both frames, `(B, 2, 27, H, W)`, extracted by the caller; ours
    takes them the same way (`inputs=`) or extracts them itself from the frames (`pixel_values=`). The processor
    scales frames to [-1, 1] and multiplies the model's flow by 20 (DeepMind's `FLOW_SCALE_FACTOR`: the checkpoint
    predicts flow / 20 after its output rescaling by 100).
    """
    state = dict(hf_model.state_dict())
    c = hf_model.config
    fields, mapping = _encoder_config_and_mapping(hf_model, state)
    num_input_channels = fields.pop("_num_input_channels")
    preprocessor = hf_model.perceiver.input_preprocessor
    flow_decoder = hf_model.perceiver.decoder
    _require(preprocessor.prep_type == "patches", "prep_type", preprocessor.prep_type, "'patches'")
    _require(
        preprocessor.spatial_downsample == 1 and preprocessor.temporal_downsample == 2,
        "spatial_downsample, temporal_downsample",
        (preprocessor.spatial_downsample, preprocessor.temporal_downsample),
        "(1, 2): one pixel of two frames",
    )
    _require(
        preprocessor.concat_or_add_pos == "concat", "concat_or_add_pos", preprocessor.concat_or_add_pos, "'concat'"
    )
    position_encoding = preprocessor.position_embeddings
    _require(preprocessor.position_encoding_type == "fourier" and position_encoding.concat_pos
             and not position_encoding.sine_only, "position_encoding",
             {"type": preprocessor.position_encoding_type, "concat_pos": getattr(position_encoding, "concat_pos", None),
              "sine_only": getattr(position_encoding, "sine_only", None)},
             "Fourier features with concat_pos=True, sine_only=False")  # fmt: skip
    _require(isinstance(preprocessor.positions_projection, nn.Identity), "project_pos_dim",
             preprocessor.project_pos_dim, "-1 (no projection)")  # fmt: skip
    projection = preprocessor.conv_after_patches
    patch_channels = projection.in_features if isinstance(projection, nn.Linear) else None
    per_frame = (patch_channels or num_input_channels - position_encoding.output_size()) // 2
    _require(per_frame == 27, "conv_after_patching_in_channels", 2 * per_frame,
             "54: 3 x 3 patches of 3 channels per frame")  # fmt: skip
    train_size = [int(n) for n in c.train_size]
    fields |= _decoder_fields("perceiver.decoder.decoder", flow_decoder.decoder, state)
    config = PerceiverConfig(
        input_adapter="flow",
        flow_image_size=train_size,
        num_channels=3,
        flow_patch_size=3,
        num_frequency_bands=position_encoding.num_bands,
        flow_max_frequencies=[float(n) for n in position_encoding.max_resolution],
        flow_projection_channels=projection.out_features if patch_channels else None,
        flow_rescale_factor=float(flow_decoder.rescale_factor),
        **fields,
    )
    ours = "perceiver.encoder.input_adapter"
    if patch_channels:
        for kind in ("weight", "bias"):
            mapping[f"perceiver.input_preprocessor.conv_after_patches.{kind}"] = f"{ours}.projection.{kind}"
    mapping |= _layer_mapping(
        "perceiver.decoder.decoder.decoding_cross_attention", "flow_decoder.cross_attention", True
    )
    for kind in ("weight", "bias"):
        mapping[f"perceiver.decoder.decoder.final_layer.{kind}"] = f"flow_decoder.output_adapter.linear.{kind}"
    model = PerceiverForOpticalFlow(config)
    _load_mapped(model, state, mapping)
    processor = PerceiverOpticalFlowProcessor(
        tile_size=train_size, min_overlap=min(20, min(train_size) // 2), flow_scale_factor=20.0
    )
    return model, processor


def _fourier_kwargs(encoding: nn.Module, where: str) -> tuple[int, list[float]]:
    """(num_bands, max_resolution) of a transformers `PerceiverFourierPositionEncoding` with DeepMind's defaults."""
    _require(type(encoding).__name__ == "PerceiverFourierPositionEncoding" and encoding.concat_pos
             and not encoding.sine_only, f"{where} position encoding",
             {"type": type(encoding).__name__, "concat_pos": getattr(encoding, "concat_pos", None),
              "sine_only": getattr(encoding, "sine_only", None)},
             "Fourier features with concat_pos=True, sine_only=False")  # fmt: skip
    return encoding.num_bands, [float(r) for r in encoding.max_resolution]


def _convert_multimodal_autoencoding(hf_model: nn.Module):
    """transformers' `PerceiverForMultimodalAutoencoding` (`deepmind/multimodal-perceiver`: video, audio and label of
    Kinetics) -> `PerceiverForMultimodalAutoencoding`, with a `PerceiverMultimodalAutoencodingProcessor`.

    Inputs: the modalities "audio" (sample patches), "image" (video frames as space-time patches) and "label"
    (a one-hot vector), each with its Fourier features (none for the label), padded with a learned per-modality vector
    (`modality_encoding="concat"`, transformers' `min_padding_size`); every modality has a learned mask token, and
    transformers always masks the label (`mask_probs`): the converted model masks it when it is left out of the
    inputs (or with `masked={"label": True}`), and in training with probability `mask_prob`. Queries: Fourier
    features of the output points (video: every pixel; audio: every patch) and a learned label query, padded with a
    learned per-modality vector. transformers decodes subsampled points only (its full-grid queries are malformed);
    `output_points` here takes the same indices as its `subsampled_output_points`.
    """
    from .modeling_multimodal_autoencoding import PerceiverForMultimodalAutoencoding
    from .processing_multimodal_autoencoding import PerceiverMultimodalAutoencodingProcessor

    state = dict(hf_model.state_dict())
    c = hf_model.config
    fields, mapping = _encoder_config_and_mapping(hf_model, state)
    fields.pop("_num_input_channels")
    preprocessor = hf_model.perceiver.input_preprocessor
    multimodal_decoder = hf_model.perceiver.decoder
    postprocessor = hf_model.perceiver.output_postprocessor
    names = sorted(preprocessor.modalities)
    _require(names == ["audio", "image", "label"], "modalities", names, "['audio', 'image', 'label']")
    _require(sorted(multimodal_decoder.modalities) == names, "decoder modalities",
             sorted(multimodal_decoder.modalities), str(names))  # fmt: skip

    audio = preprocessor.modalities["audio"]
    _require(audio.concat_or_add_pos == "concat" and audio.position_encoding_type == "fourier"
             and isinstance(audio.positions_projection, nn.Identity), "audio preprocessor",
             {"concat_or_add_pos": audio.concat_or_add_pos, "position_encoding_type": audio.position_encoding_type},
             "'concat' Fourier features, not projected")  # fmt: skip
    audio_bands, audio_max = _fourier_kwargs(audio.position_embeddings, "audio")
    image = preprocessor.modalities["image"]
    _require(image.prep_type == "patches" and image.concat_or_add_pos == "concat"
             and image.position_encoding_type == "fourier" and isinstance(image.conv_after_patches, nn.Identity)
             and isinstance(image.positions_projection, nn.Identity), "image preprocessor",
             {"prep_type": image.prep_type, "concat_or_add_pos": image.concat_or_add_pos,
              "conv_after_patching": image.conv_after_patching},
             "'patches' with concatenated Fourier features")  # fmt: skip
    image_bands, image_max = _fourier_kwargs(image.position_embeddings, "image")
    _require(len(image_max) == 3, "image max_resolution", image_max, "(frames, height, width)")
    _require(image_max[0] > 1, "num_frames", image_max[0],
             "at least 2 (transformers drops the time axis of one-frame videos)")  # fmt: skip
    label = preprocessor.modalities["label"]
    num_labels = label.num_channels
    mask_probs = dict(preprocessor.mask_probs)
    _require(set(mask_probs) <= set(names), "mask_probs", mask_probs, f"modalities of {names}")
    patch = [image.temporal_downsample, image.spatial_downsample, image.spatial_downsample]
    modalities = [
        {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": audio_bands, "max_freq": audio_max[0],
         "patch_size": audio.samples_per_patch},
        {"name": "image", "channels": image.in_channels, "num_axes": 3, "num_freq_bands": image_bands,
         "max_freq": image_max, "patch_size": patch},
        {"name": "label", "channels": num_labels, "num_axes": 1, "num_freq_bands": 0, "max_freq": 1.0,
         "one_hot": True},
    ]  # fmt: skip
    for spec in modalities:
        if spec["name"] in mask_probs:
            spec |= {"mask_token": True, "mask_prob": float(mask_probs[spec["name"]])}

    audio_decoder = multimodal_decoder.modalities["audio"]
    image_decoder = multimodal_decoder.modalities["image"].decoder
    label_decoder = multimodal_decoder.modalities["label"].decoder
    audio_q_bands, audio_q_max = _fourier_kwargs(audio_decoder.output_position_encodings, "audio query")
    image_q_bands, image_q_max = _fourier_kwargs(image_decoder.output_position_encodings, "image query")
    _require(label_decoder.position_encoding_type == "trainable", "label query", label_decoder.position_encoding_type,
             "'trainable'")  # fmt: skip
    for where, decoder in (("audio", audio_decoder), ("image", image_decoder), ("label", label_decoder)):
        _require(decoder.position_encoding_only and not decoder.concat_preprocessed_input
                 and isinstance(decoder.positions_projection, nn.Identity), f"{where} query decoder",
                 {"position_encoding_only": decoder.position_encoding_only,
                  "concat_preprocessed_input": decoder.concat_preprocessed_input},
                 "queries of position features only, not projected")  # fmt: skip
    audio_points = int(audio_decoder.output_index_dims[0])
    audio_out = postprocessor.modalities["audio"].classifier.out_features  # samples per query
    image_dims = [int(n) for n in image_decoder.output_index_dims]
    label_channels = state["perceiver.decoder.modalities.label.decoder.output_position_encodings.position_embeddings"]
    outputs = [
        {"name": "audio", "shape": [audio_points * audio_out], "patch_size": audio_out,
         "num_freq_bands": audio_q_bands, "max_freq": audio_q_max},
        {"name": "image", "shape": image_dims, "patch_size": 1, "num_freq_bands": image_q_bands,
         "max_freq": image_q_max},
        {"name": "label", "query_channels": label_channels.shape[-1]},
    ]  # fmt: skip
    _require(postprocessor.modalities["image"].classifier.out_features == image.in_channels, "image output channels",
             postprocessor.modalities["image"].classifier.out_features, f"the input's {image.in_channels}")  # fmt: skip
    query_widths = {name: multimodal_decoder.modalities[name].num_query_channels for name in names}
    fields |= _decoder_fields("perceiver.decoder.decoder", multimodal_decoder.decoder, state)
    config = PerceiverConfig(
        input_adapter="multimodal",
        modalities=modalities,
        modality_encoding="concat",
        modality_padding=preprocessor.min_padding_size,
        autoencoding_outputs=outputs,
        autoencoding_query_padding=multimodal_decoder.num_query_channels - max(query_widths.values()),
        autoencoding_output_channels=multimodal_decoder.output_num_channels,
        num_labels=num_labels,
        **({"id2label": dict(c.id2label), "label2id": dict(c.label2id)} if len(c.id2label) == num_labels else {}),
        **fields,
    )
    ours = "perceiver.encoder.input_adapter"
    for name in names:
        mapping[f"perceiver.input_preprocessor.padding.{name}"] = f"{ours}.modality_padding.{name}"
        mapping[f"perceiver.decoder.padding.{name}"] = f"queries.padding.{name}"
        if name in mask_probs:
            mapping[f"perceiver.input_preprocessor.mask.{name}"] = f"{ours}.mask_tokens.{name}"
        for kind in ("weight", "bias"):
            mapping[f"perceiver.output_postprocessor.modalities.{name}.classifier.{kind}"] = (
                f"output_heads.{name}.{kind}"
            )
    mapping["perceiver.decoder.modalities.label.decoder.output_position_encodings.position_embeddings"] = (
        "queries.learned.label"
    )
    mapping |= _layer_mapping("perceiver.decoder.decoder.decoding_cross_attention", "decoder.cross_attention", True)
    for kind in ("weight", "bias"):
        mapping[f"perceiver.decoder.decoder.final_layer.{kind}"] = f"decoder.output_adapter.linear.{kind}"
    model = PerceiverForMultimodalAutoencoding(config)
    _load_mapped(model, state, mapping)
    processor = PerceiverMultimodalAutoencodingProcessor(
        num_frames=image_dims[0], image_size=image_dims[1:], num_channels=image.in_channels,
        num_audio_samples=audio_points * audio_out, sampling_rate=48000, normalize_audio=False,
        num_labels=num_labels,
    )  # fmt: skip
    return model, processor


def _load_mapped(
    model: PerceiverPreTrainedModel,
    hf_state: dict[str, torch.Tensor],
    mapping: dict[str, str],
    tied: set[str] = frozenset(),
) -> None:
    """Copy `hf_state[hf_key]` into `model[our_key]`; every weight on both sides must be accounted for."""
    ours = model.state_dict()
    unmapped_hf = sorted(set(hf_state) - set(mapping))
    if unmapped_hf:
        raise ConversionError(f"transformers weights without a counterpart in perceiver_hf: {unmapped_hf[:8]}")
    missing_ours = sorted(set(ours) - set(mapping.values()) - set(tied))
    if missing_ours:
        raise ConversionError(f"perceiver_hf weights not filled by the conversion: {missing_ours[:8]}")
    converted = {}
    for hf_key, our_key in mapping.items():
        source = hf_state[hf_key]
        if source.shape != ours[our_key].shape:
            raise ConversionError(
                f"{hf_key} has shape {tuple(source.shape)} but {our_key} expects {tuple(ours[our_key].shape)}"
            )
        converted[our_key] = source.detach().clone()
    model.load_state_dict(converted, strict=False)
    model.tie_weights()
    model.eval()


_CONVERTERS = {
    "PerceiverForMaskedLM": _convert_masked_lm,
    "PerceiverForImageClassificationLearned": _convert_image_classifier,
    "PerceiverForImageClassificationFourier": _convert_image_classifier,
    "PerceiverForImageClassificationConvProcessing": _convert_image_classifier,
    "PerceiverForOpticalFlow": _convert_optical_flow,
    "PerceiverForMultimodalAutoencoding": _convert_multimodal_autoencoding,
}
# transformers class names this module converts
SUPPORTED_CLASSES = tuple(_CONVERTERS)


def convert_transformers_perceiver(model_or_path, save_directory: str | Path | None = None):
    """Convert a transformers Perceiver model into the equivalent `perceiver_hf` model.

    Args:
        model_or_path: a transformers Perceiver model object (`PerceiverForMaskedLM`,
            `PerceiverForImageClassificationLearned`, `PerceiverForImageClassificationFourier`,
            `PerceiverForImageClassificationConvProcessing`, `PerceiverForOpticalFlow`,
            `PerceiverForMultimodalAutoencoding`), a local directory, or a Hub id (needs internet).
        save_directory: if given, `save_pretrained` the converted model and its tokenizer or image processor
            there.

    Returns:
        `(model, tokenizer_or_image_processor)`: the converted model in eval mode and the matching
        preprocessor (transformers' byte-level `PerceiverTokenizer` for the language model, a
        `PerceiverImageProcessor` for the image classifiers, a `PerceiverOpticalFlowProcessor` for optical flow,
        a `PerceiverMultimodalAutoencodingProcessor` for multimodal autoencoding).

    Raises:
        ConversionError: for a model class or setting that perceiver_hf cannot represent exactly,
            naming the setting.
    """
    hf_model = _load_transformers_model(model_or_path)
    class_name = type(hf_model).__name__
    if class_name not in _CONVERTERS:
        raise ConversionError(f"model class {class_name!r} cannot be converted; supported: {list(_CONVERTERS)}")
    model, preprocessor = _CONVERTERS[class_name](hf_model)
    if save_directory is not None:
        model.save_pretrained(save_directory)
        if preprocessor is not None:
            preprocessor.save_pretrained(save_directory)
    return model, preprocessor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m perceiver_hf.convert",
        description="Convert a transformers Perceiver model (local directory or Hub id) to perceiver_hf.",
    )
    parser.add_argument("model", help="transformers Perceiver model: local directory or Hub id")
    parser.add_argument("output_dir", help="where to save the converted model")
    args = parser.parse_args(argv)
    import perceiver_hf  # noqa: F401  (registers the Auto classes for the saved config)

    model, _ = convert_transformers_perceiver(args.model, save_directory=args.output_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"saved {type(model).__name__} ({num_parameters:,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
