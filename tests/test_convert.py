"""Conversion of transformers' Perceiver models: logit parity, fill-mask parity, clear errors."""

from __future__ import annotations

import subprocess
import sys

import PIL.Image
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PerceiverForImageClassificationConvProcessing,
    PerceiverForImageClassificationFourier,
    PerceiverForImageClassificationLearned,
    PerceiverTokenizer,
    pipeline,
)
from transformers import PerceiverConfig as TransformersPerceiverConfig
from transformers import PerceiverForMaskedLM as TransformersPerceiverForMaskedLM
from transformers.image_utils import PILImageResampling
from transformers.models.perceiver.image_processing_pil_perceiver import PerceiverImageProcessorPil
from transformers.models.perceiver.modeling_perceiver import PerceiverImagePreprocessor, PerceiverModel

import perceiver_hf
from perceiver_hf.convert import ConversionError, convert_transformers_perceiver

TOLERANCE = 1e-4  # max absolute logit difference, fp32


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every weight with a large std so that logits differ visibly between wrong mappings
    (the default init gives logits of ~1e-3, where a 1e-4 tolerance proves little), and move BatchNorm's
    running statistics away from their defaults (mean 0, variance 1), so that dropping them would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.uniform_(0.3, 3.0, generator=generator)
                module.num_batches_tracked.fill_(1000)
    return model.eval()


MLM_CONFIGS = {
    "qk_v_widening": dict(qk_channels=32, v_channels=64, self_attention_widening_factor=2,
                          cross_attention_widening_factor=3, num_cross_attention_heads=2),
    "default_channels_no_query_residual": dict(use_query_residual=False, num_cross_attention_heads=4),
    "shape_for_attention_q": dict(cross_attention_shape_for_attention="q", num_cross_attention_heads=1),
}  # fmt: skip


@pytest.mark.parametrize("overrides", MLM_CONFIGS.values(), ids=MLM_CONFIGS.keys())
def test_masked_lm_logits_match(overrides):
    config = TransformersPerceiverConfig(
        num_latents=16, d_latents=64, d_model=48, num_blocks=2, num_self_attends_per_block=2,
        num_self_attention_heads=4, vocab_size=262, max_position_embeddings=96, **overrides,
    )  # fmt: skip
    reference = _randomize(TransformersPerceiverForMaskedLM(config), seed=0)
    model, tokenizer = convert_transformers_perceiver(reference)
    assert isinstance(model, perceiver_hf.PerceiverForMaskedLM)
    assert isinstance(tokenizer, PerceiverTokenizer)

    input_ids = torch.randint(0, 262, (3, 40), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 25:] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # transformers always decodes all max_position_embeddings positions; ours cover the input length.
    assert expected.shape == (3, 96, 262)
    assert actual.shape == (3, 40, 262)
    assert expected.abs().max() > 1.0  # the comparison below is meaningful
    assert (actual - expected[:, :40]).abs().max() < TOLERANCE


def test_image_classifier_fourier_logits_match():
    config = TransformersPerceiverConfig(
        num_latents=16, d_latents=64, num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
        num_cross_attention_heads=1, num_labels=7, self_attention_widening_factor=2,
    )  # fmt: skip
    reference = _randomize(PerceiverForImageClassificationFourier(config), seed=2)
    model, _ = convert_transformers_perceiver(reference)
    assert isinstance(model, perceiver_hf.PerceiverForImageClassification)
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).logits
        actual = model(pixel_values=pixel_values).logits
    assert expected.abs().max() > 1.0
    assert (actual - expected).abs().max() < TOLERANCE


IMAGE_CONFIG = dict(
    num_latents=16, d_latents=64, num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
    num_cross_attention_heads=2, qk_channels=32, v_channels=64, self_attention_widening_factor=2,
    cross_attention_widening_factor=3, num_labels=7, image_size=16,
)  # fmt: skip


def _with_preprocessor(model: torch.nn.Module, **preprocessor_kwargs) -> torch.nn.Module:
    """`model` (a transformers image classifier) with another `PerceiverImagePreprocessor`, e.g. other widths than
    its class builds; the encoder is rebuilt for the new input width."""
    preprocessor = PerceiverImagePreprocessor(model.config, **preprocessor_kwargs)
    model.perceiver = PerceiverModel(model.config, input_preprocessor=preprocessor, decoder=model.perceiver.decoder)
    return model


def _learned(out_channels: int, position_channels: int, project_pos_dim: int):
    """`PerceiverForImageClassificationLearned` with a "conv1x1" of `out_channels` and `position_channels` learned
    positions projected to `project_pos_dim` (-1: not projected); the class itself builds (256, 256, 256)."""

    def build(config):
        model = PerceiverForImageClassificationLearned(config)
        if (out_channels, position_channels, project_pos_dim) == (256, 256, 256):
            return model
        return _with_preprocessor(
            model, prep_type="conv1x1", spatial_downsample=1, out_channels=out_channels,
            position_encoding_type="trainable", concat_or_add_pos="concat", project_pos_dim=project_pos_dim,
            trainable_position_encoding_kwargs=dict(num_channels=position_channels, index_dims=config.image_size**2),
        )  # fmt: skip

    return build


IMAGE_CLASSIFIERS = {
    # name: (builder of the transformers model from its config, image height and width)
    "learned": (PerceiverForImageClassificationLearned, 16),
    "learned_projected_positions_24_to_20": (_learned(24, 24, 20), 16),
    "learned_unprojected_positions": (_learned(24, 12, -1), 16),
    "conv_even_size": (PerceiverForImageClassificationConvProcessing, 32),
    "conv_odd_size": (PerceiverForImageClassificationConvProcessing, 33),
    "fourier": (PerceiverForImageClassificationFourier, 24),
}


@pytest.mark.parametrize("name", IMAGE_CLASSIFIERS)
def test_image_classifier_logits_match(name):
    build, size = IMAGE_CLASSIFIERS[name]
    reference = _randomize(build(TransformersPerceiverConfig(**IMAGE_CONFIG)), seed=7)
    model, image_processor = convert_transformers_perceiver(reference)
    assert isinstance(model, perceiver_hf.PerceiverForImageClassification) and not model.training
    assert isinstance(image_processor, perceiver_hf.PerceiverImageProcessor)
    assert image_processor.size.height == model.config.image_size[0]
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).logits
        actual = model(pixel_values=pixel_values).logits
    assert expected.abs().max() > 1.0
    assert (actual - expected).abs().max() < TOLERANCE
    if name.startswith("conv"):
        # transformers' stem (224 -> 55 positions, not DeepMind's 56), running statistics included.
        assert model.config.image_conv_padding == "transformers" and model.config.image_size == [224, 224]
        stem = model.perceiver.input_adapter.preprocessor.layers[0].batchnorm
        torch.testing.assert_close(
            stem.running_var, reference.perceiver.input_preprocessor.convnet.batchnorm.running_var
        )
        assert not torch.allclose(stem.running_var, torch.ones_like(stem.running_var))


@pytest.mark.parametrize("name", ["learned", "learned_projected_positions_24_to_20"])
def test_interpolated_learned_positions_match_transformers(name):
    build, size = IMAGE_CLASSIFIERS[name]
    reference = _randomize(build(TransformersPerceiverConfig(**IMAGE_CONFIG)), seed=10)
    model, _ = convert_transformers_perceiver(reference)
    for side in (size + 5, size - 3):  # larger and smaller than the learned grid
        pixel_values = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            expected = reference(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
            actual = model(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
        assert expected.abs().max() > 1.0
        assert (actual - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", ["learned", "conv_even_size"])
def test_converted_image_classifier_saves_loads_trains_and_runs_in_pipeline(name, tmp_path):
    build, _ = IMAGE_CLASSIFIERS[name]
    reference = _randomize(build(TransformersPerceiverConfig(**IMAGE_CONFIG)), seed=9)
    convert_transformers_perceiver(reference, save_directory=tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(model, perceiver_hf.PerceiverForImageClassification)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, perceiver_hf.PerceiverImageProcessor)

    image = PIL.Image.fromarray(torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8).numpy())
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    # Fed like transformers' own processor feeds DeepMind's checkpoints: central 224/256, bicubic.
    assert image_processor.do_center_crop and image_processor.resample == PILImageResampling.BICUBIC
    height, width = model.config.image_size
    assert image_processor.crop_size.height == round(height * 256 / 224) and image_processor.size.width == width
    if model.config.image_size == [224, 224]:
        transformers_processor = PerceiverImageProcessorPil()
        torch.testing.assert_close(
            pixel_values, transformers_processor(image, return_tensors="pt")["pixel_values"], atol=0, rtol=0
        )
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).logits
        torch.testing.assert_close(model.eval()(pixel_values=pixel_values).logits, expected, atol=TOLERANCE, rtol=0)
    results = pipeline("image-classification", model=str(tmp_path), top_k=3)(image)
    probabilities, indices = expected.softmax(-1)[0].topk(3)
    assert [r["label"] for r in results] == [reference.config.id2label[i] for i in indices.tolist()]
    for result, probability in zip(results, probabilities.tolist(), strict=True):
        assert result["score"] == pytest.approx(probability, abs=1e-5)

    # Still trains: BatchNorm in training mode, one backward step, finite gradients everywhere.
    model.train()
    loss = model(pixel_values=torch.cat([pixel_values, -pixel_values]), labels=torch.tensor([1, 4])).loss
    loss.backward()
    assert torch.isfinite(loss)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name


UNREPRESENTABLE_IMAGE_SETTINGS = {
    "positions_added": (
        PerceiverForImageClassificationLearned,
        dict(prep_type="conv1x1", spatial_downsample=1, out_channels=32, position_encoding_type="trainable",
             concat_or_add_pos="add", trainable_position_encoding_kwargs=dict(num_channels=32, index_dims=256)),
        "concat_or_add_pos='add'",
    ),
    "conv_without_batchnorm": (
        PerceiverForImageClassificationConvProcessing,
        dict(prep_type="conv", spatial_downsample=1, conv2d_use_batchnorm=False, position_encoding_type="fourier",
             fourier_position_encoding_kwargs=dict(concat_pos=True, max_resolution=(56, 56), num_bands=64,
                                                   sine_only=False)),
        "conv2d_use_batchnorm=False",
    ),
    "patches": (
        PerceiverForImageClassificationFourier,
        dict(prep_type="patches", spatial_downsample=4, position_encoding_type="fourier",
             fourier_position_encoding_kwargs=dict(concat_pos=True, max_resolution=(56, 56), num_bands=8)),
        "prep_type='patches'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", UNREPRESENTABLE_IMAGE_SETTINGS)
def test_unrepresentable_image_setting_fails_with_the_setting_named(name):
    model_class, preprocessor_kwargs, setting = UNREPRESENTABLE_IMAGE_SETTINGS[name]
    reference = _with_preprocessor(model_class(TransformersPerceiverConfig(**IMAGE_CONFIG)), **preprocessor_kwargs)
    with pytest.raises(ConversionError, match=f"{setting} cannot be represented in perceiver_hf"):
        convert_transformers_perceiver(reference)


def test_converted_language_model_fill_mask_matches(tmp_path):
    config = TransformersPerceiverConfig(
        num_latents=16, d_latents=64, d_model=48, num_blocks=1, num_self_attends_per_block=2,
        num_self_attention_heads=4, num_cross_attention_heads=4, qk_channels=32, v_channels=64, vocab_size=262,
        max_position_embeddings=64,
    )  # fmt: skip
    reference = _randomize(TransformersPerceiverForMaskedLM(config), seed=4)
    tokenizer = PerceiverTokenizer(model_max_length=64)
    convert_transformers_perceiver(reference, save_directory=tmp_path)

    text = "This is a sentence where one byte is [MASK]issing."
    ours = pipeline("fill-mask", model=str(tmp_path), top_k=5)
    theirs = pipeline("fill-mask", model=reference, tokenizer=tokenizer, top_k=5)
    ours_result, theirs_result = ours(text), theirs(text)
    assert [r["token"] for r in ours_result] == [r["token"] for r in theirs_result]
    for a, b in zip(ours_result, theirs_result, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_converted_model_keeps_package_capabilities():
    config = TransformersPerceiverConfig(
        num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=2, vocab_size=262, max_position_embeddings=64,
    )  # fmt: skip
    model, _ = convert_transformers_perceiver(_randomize(TransformersPerceiverForMaskedLM(config), seed=5))
    input_ids = torch.randint(0, 262, (2, 30))
    model.set_attn_implementation("eager")
    eager_logits = model(input_ids=input_ids).logits
    model.set_attn_implementation("sdpa")
    assert model.perceiver.encoder.cross_attention["0"].attention.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(input_ids=input_ids).logits, eager_logits, atol=1e-4, rtol=1e-4)

    model.train()
    model.activation_checkpointing_enable()
    labels = torch.full_like(input_ids, -100)
    labels[:, 5] = input_ids[:, 5]
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    assert model.perceiver.encoder.latent.grad is not None


def test_unsupported_setting_fails_with_the_setting_named():
    config = TransformersPerceiverConfig(
        num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=2, vocab_size=262, max_position_embeddings=64,
        hidden_act="relu",
    )  # fmt: skip
    with pytest.raises(ConversionError, match="hidden_act='relu'"):
        convert_transformers_perceiver(TransformersPerceiverForMaskedLM(config))


def test_unsupported_model_class_fails_clearly():
    with pytest.raises(ConversionError, match="cannot be converted"):
        convert_transformers_perceiver(torch.nn.Linear(2, 2))


def test_command_line_converts_a_local_directory(tmp_path):
    config = TransformersPerceiverConfig(
        num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=2, vocab_size=262, max_position_embeddings=64,
    )  # fmt: skip
    reference = _randomize(TransformersPerceiverForMaskedLM(config), seed=6)
    reference.save_pretrained(tmp_path / "transformers")
    result = subprocess.run(
        [sys.executable, "-m", "perceiver_hf.convert", str(tmp_path / "transformers"), str(tmp_path / "ours")],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "", "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "ours")
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "ours"), PerceiverTokenizer)
    input_ids = torch.randint(0, 262, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits[:, :20], atol=1e-4, rtol=0
        )
