"""Image classification: the image input adapter and its preprocessing variants, the image processor, the
image-classification pipeline, and `examples/run_image_classification.py` on the shipped MNIST sample."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import DATA_DIR, REPO_ROOT
from perceiver_tester import tiny_image_config, tiny_text_config
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from transformers.models.perceiver.modeling_perceiver import Conv2DDownsample as TransformersConv2DDownsample
from transformers.models.perceiver.modeling_perceiver import space_to_depth as transformers_space_to_depth

import perceiver_hf.position_encoding as position_encoding_module
from perceiver_hf import (
    ImageInputAdapter,
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForSequenceClassification,
    PerceiverImageProcessor,
    PerceiverModel,
    fourier_features,
)
from perceiver_hf.adapters import ConvDownsample, _same_padding, space_to_depth


def mnist_sample(split: str = "test", n: int = 8) -> tuple[list[PIL.Image.Image], list[int]]:
    """The first `n` images (PIL, mode "L", 28x28) and labels of the shipped MNIST sample."""
    import pyarrow.parquet as pq

    table = pq.read_table(DATA_DIR / f"mnist_{split}.parquet").slice(0, n).to_pydict()
    images = [PIL.Image.open(io.BytesIO(image["bytes"])) for image in table["image"]]
    return images, table["label"]


# --------------------------------------------------------------------------------------------------
# ImageInputAdapter
# --------------------------------------------------------------------------------------------------


def test_channels_first_and_last_give_the_same_inputs() -> None:
    adapter = ImageInputAdapter(image_shape=(6, 5, 3), num_frequency_bands=4)
    images = torch.randn(2, 6, 5, 3)
    adapted = adapter(images)
    # 3 pixel channels, then per axis: the position, 4 sines and 4 cosines.
    assert adapted.shape == (2, 30, 3 + 2 * (1 + 2 * 4)) and adapter.num_input_channels == adapted.shape[-1]
    torch.testing.assert_close(adapter(images.permute(0, 3, 1, 2)), adapted)
    # Pixels row-major in front, then the same position features for every example.
    torch.testing.assert_close(adapted[..., :3], images.reshape(2, 30, 3))
    expected_positions = fourier_features((6, 5), 4, max_frequencies=(6, 5))
    torch.testing.assert_close(adapted[0, :, 3:], expected_positions)
    torch.testing.assert_close(adapted[1, :, 3:], expected_positions)


def test_fourier_features_follow_deepmind_layout() -> None:
    features = fourier_features((4, 3), num_frequency_bands=2, max_frequencies=(4, 3))
    assert features.shape == (12, 2 + 2 * 2 * 2)
    positions = features[:, :2]
    # Raw positions on a [-1, 1] grid per axis, row-major.
    torch.testing.assert_close(positions[:3, 0], torch.full((3,), -1.0))
    torch.testing.assert_close(positions[:3, 1], torch.linspace(-1, 1, 3))
    # Frequencies 1 .. max/2 per axis; sines of all axes, then cosines of all axes.
    frequencies = torch.tensor([[1.0, 2.0], [1.0, 1.5]])
    angles = (math.pi * positions[:, :, None] * frequencies[None]).reshape(12, 4)
    torch.testing.assert_close(features[:, 2:6], torch.sin(angles))
    torch.testing.assert_close(features[:, 6:], torch.cos(angles))


def test_fourier_features_are_cached_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = position_encoding_module.fourier_features

    def counting(*args, **kwargs):
        calls.append(tuple(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(position_encoding_module, "fourier_features", counting)
    model = PerceiverForImageClassification(tiny_image_config()).eval()
    encoding = model.perceiver.input_adapter.position_encoding
    pixel_values = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        first = model(pixel_values=pixel_values).logits
        for _ in range(3):
            torch.testing.assert_close(model(pixel_values=pixel_values).logits, first)
    assert calls == [(6, 5)], "the features of one shape must be computed once, not at every forward"
    cached = encoding((6, 5), torch.device("cpu"), torch.float32)
    assert cached is encoding((6, 5), torch.device("cpu"), torch.float32)

    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 8, 4))
        model(pixel_values=torch.randn(3, 3, 8, 4))
    assert calls == [(6, 5), (8, 4)]
    # A new dtype is a new entry; the cache is never part of the weights.
    encoding((6, 5), torch.device("cpu"), torch.float64)
    assert len(calls) == 3
    assert not any("position_encoding" in key for key in model.state_dict())


def test_fourier_model_classifies_other_image_sizes() -> None:
    config = tiny_image_config()
    model = PerceiverForImageClassification(config).eval()
    adapter = model.perceiver.input_adapter
    for height, width in [(6, 5), (9, 7), (3, 3)]:
        with torch.no_grad():
            logits = model(pixel_values=torch.randn(2, 3, height, width)).logits
        assert logits.shape == (2, config.num_labels) and torch.isfinite(logits).all()
    # Other sizes keep the configured maximum frequency: a 9x7 grid samples the same frequencies.
    positions = adapter(torch.randn(1, 9, 7, 3))[0, :, 3:]
    torch.testing.assert_close(positions, fourier_features((9, 7), 3, max_frequencies=(6, 5)))


def test_learned_positions_fix_the_image_size() -> None:
    config = tiny_image_config(image_position_encoding="learned")
    model = PerceiverForImageClassification(config)
    adapter = model.perceiver.input_adapter
    assert adapter.position_encoding.weight.shape == (6 * 5, adapter.num_input_channels - 3)
    loss = model(pixel_values=torch.randn(2, 3, 6, 5), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert adapter.position_encoding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"images of size \(7, 5\) do not match the learned positions"):
        model(pixel_values=torch.randn(2, 3, 7, 5))


def test_interpolate_pos_encoding_resizes_learned_positions() -> None:
    model = PerceiverForImageClassification(tiny_image_config(image_position_encoding="learned")).eval()
    adapter = model.perceiver.input_adapter
    images = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        # At the configured size nothing changes; the resized table keeps a constant table constant.
        torch.testing.assert_close(model(pixel_values=images, interpolate_pos_encoding=True).logits,
                                   model(pixel_values=images).logits)  # fmt: skip
        assert model(pixel_values=torch.randn(2, 3, 9, 4), interpolate_pos_encoding=True).logits.shape == (2, 3)
        channels = adapter.position_encoding.weight.shape[1]
        constant_per_channel = torch.linspace(-1, 1, channels)
        adapter.position_encoding.weight.copy_(constant_per_channel.expand(6 * 5, channels))
        resized = adapter.interpolated_positions((9, 4))
        torch.testing.assert_close(resized, constant_per_channel.expand(9 * 4, channels))
    text_model = PerceiverModel(tiny_text_config())
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True applies to image models"):
        text_model(input_ids=torch.ones(1, 4, dtype=torch.long), interpolate_pos_encoding=True)


def test_space_to_depth_matches_transformers() -> None:
    images = torch.randn(2, 3, 8, 12)  # channels first, as transformers expects
    ours = space_to_depth(images.permute(0, 2, 3, 1), 4)
    torch.testing.assert_close(ours, transformers_space_to_depth(images, spatial_block_size=4))
    assert ours.shape == (2, 2, 3, 48)
    with pytest.raises(ValueError, match=r"image size \(8, 12\) must be divisible by spatial_downsample \(5\)"):
        space_to_depth(images.permute(0, 2, 3, 1), 5)


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [(224, 7, 2, (2, 3)), (112, 3, 2, (0, 1)), (7, 7, 2, (3, 3)), (5, 3, 2, (1, 1)), (1, 3, 2, (1, 1))],
)
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    # TensorFlow "SAME": output ceil(size / stride); total padding split with the extra unit after.
    assert _same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


def test_conv_downsample_is_deepmind_conv_stem() -> None:
    stem = ConvDownsample(in_channels=3, out_channels=8, num_layers=1)
    assert isinstance(stem.layers[0].conv, torch.nn.Conv2d) and stem.layers[0].conv.kernel_size == (7, 7)
    assert stem.layers[0].conv.stride == (2, 2) and stem.layers[0].conv.bias is None
    assert isinstance(stem.layers[0].batchnorm, torch.nn.BatchNorm2d)
    # 4x downsampling per layer, rounding up (224 -> 56 as in DeepMind's ImageNet model).
    assert stem(torch.randn(1, 3, 30, 29)).shape == (1, 8, 8, 8)
    assert ConvDownsample.output_size(224, 1) == 56 and ConvDownsample.output_size(224, 2) == 14
    # The output is a max over ReLUs, so never negative, and padding never wins the max-pool.
    out = ConvDownsample(3, 4, num_layers=2)(torch.randn(2, 3, 33, 17))
    assert out.shape == (2, 4, 3, 2) and (out >= 0).all()


@pytest.mark.parametrize("size", [(32, 33), (224, 15), (5, 6)])
def test_conv_downsample_transformers_padding_matches_transformers_stem(size: tuple[int, int]) -> None:
    # transformers' port pads the convolution by 3 on every side and not the max-pool: 224 -> 55, not 56.
    theirs = TransformersConv2DDownsample(in_channels=3, out_channels=8).eval()
    ours = ConvDownsample(3, 8, num_layers=1, padding="transformers").eval()
    with torch.no_grad():
        theirs.batchnorm.running_mean.normal_()
        theirs.batchnorm.running_var.uniform_(0.5, 2.0)
        theirs.batchnorm.weight.normal_()
    ours.layers[0].load_state_dict(theirs.state_dict())
    images = torch.randn(2, 3, *size)
    expected = theirs(images)
    torch.testing.assert_close(ours(images), expected)
    assert expected.shape[-2:] == tuple(ConvDownsample.output_size(n, 1, "transformers") for n in size)
    assert ConvDownsample.output_size(224, 1, "transformers") == 55
    assert ConvDownsample.output_size(4, 1, "transformers") == 0
    with pytest.raises(ValueError, match=r"images of size \(4, 8\) are too small .* padding='transformers'"):
        ours(torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match=r"padding \('valid'\) must be one of \['same', 'transformers'\]"):
        ConvDownsample(3, 8, padding="valid")


def test_position_projection_and_learned_position_width() -> None:
    # DeepMind's "conv1x1" + learned positions (vision-perceiver-learned): pixels projected to 5 channels,
    # 4-channel learned positions projected to 6 channels, concatenated.
    config = tiny_image_config(
        image_projection_channels=5,
        image_position_encoding="learned",
        image_position_channels=4,
        image_position_projection_channels=6,
    )
    model = PerceiverForImageClassification(config)
    adapter = model.perceiver.input_adapter
    assert adapter.position_encoding.weight.shape == (30, 4) and adapter.num_input_channels == 5 + 6
    images = torch.randn(2, 3, 6, 5)
    adapted = adapter(images)
    positions = adapter.position_projection(adapter.position_encoding.weight)
    torch.testing.assert_close(adapted[1, :, 5:], positions)
    torch.testing.assert_close(adapted[..., :5], adapter.projection(images.permute(0, 2, 3, 1)).reshape(2, 30, 5))
    # Fourier features can be projected too.
    fourier = tiny_image_config(image_position_projection_channels=7)
    assert PerceiverForImageClassification(fourier).perceiver.input_adapter.num_input_channels == 3 + 7


@pytest.mark.parametrize(
    "overrides, grid, num_features",
    [
        ({"image_preprocessing": "pixels"}, (8, 12), 3),
        ({"image_preprocessing": "pixels", "spatial_downsample": 2, "image_projection_channels": 5}, (4, 6), 5),
        ({"image_preprocessing": "patches"}, (2, 3), 48),
        ({"image_preprocessing": "patches", "spatial_downsample": 2, "image_projection_channels": 7}, (4, 6), 7),
        ({"image_preprocessing": "conv"}, (2, 3), 64),
        ({"image_preprocessing": "conv", "image_projection_channels": 6}, (2, 3), 6),
        ({"image_preprocessing": "patches", "image_position_encoding": "learned"}, (2, 3), 48),
        ({"image_preprocessing": "conv", "image_position_encoding": "learned"}, (2, 3), 64),
        ({"image_preprocessing": "conv", "image_conv_padding": "transformers"}, (1, 2), 64),
        (
            {
                "image_projection_channels": 5,
                "image_position_encoding": "learned",
                "image_position_channels": 4,
                "image_position_projection_channels": 6,
            },
            (8, 12),
            5,
        ),
    ],
)
def test_preprocessing_variants(tmp_path: Path, overrides: dict, grid: tuple[int, int], num_features: int) -> None:
    config = tiny_image_config(image_size=[8, 12], **overrides)
    model = PerceiverForImageClassification(config)
    adapter = model.perceiver.input_adapter
    pixel_values = torch.randn(2, 3, 8, 12)
    adapted = adapter(pixel_values)
    assert adapter.grid_shape == grid
    assert adapted.shape == (2, grid[0] * grid[1], adapter.num_input_channels)
    if config.image_position_encoding == "fourier":
        assert adapter.num_input_channels == num_features + 2 * (1 + 2 * config.num_frequency_bands)
        torch.testing.assert_close(adapted[0, :, num_features:], fourier_features(grid, 3, max_frequencies=grid))

    # Trains (every weight of the adapter gets a gradient) and round-trips through save/load exactly.
    labels = torch.tensor([0, 1])
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)
    if config.image_position_encoding == "fourier":  # Fourier models also take other sizes after preprocessing
        assert model(pixel_values=torch.randn(1, 3, 16, 16)).logits.shape == (1, config.num_labels)


def test_pixels_subsampling_keeps_every_nth_pixel() -> None:
    adapter = ImageInputAdapter(image_shape=(6, 5, 1), num_frequency_bands=2, spatial_downsample=2)
    images = torch.arange(30.0).reshape(1, 6, 5, 1)
    assert adapter.grid_shape == (3, 3)
    torch.testing.assert_close(adapter(images)[0, :, 0], images[0, ::2, ::2, 0].reshape(-1))


def test_original_api_adapter_defaults_are_unchanged() -> None:
    # The original project's snippet: pixels with 2 x (2 x 32 + 1) Fourier channels and no extra modules.
    adapter = ImageInputAdapter(image_shape=(28, 28, 1), num_frequency_bands=32)
    assert adapter.num_input_channels == 1 + 2 * 65 and adapter.preprocessing == "pixels"
    assert list(adapter.state_dict()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_preprocessing": "conv", "spatial_downsample": 8}, r"spatial_downsample \(8\) must be a power of 4"),
        ({"image_preprocessing": "conv", "spatial_downsample": 2}, r"spatial_downsample \(2\) must be a power of 4"),
        ({"image_preprocessing": "patches"}, r"image_size \(\[6, 5\]\) must be divisible by spatial_downsample \(4\)"),
        ({"spatial_downsample": 0}, r"spatial_downsample \(0\) must be a positive integer"),
        ({"image_projection_channels": -1}, r"image_projection_channels \(-1\) must be a positive integer"),
        ({"image_preprocessing": "resize"}, r"image_preprocessing \('resize'\) must be one of"),
        ({"image_conv_padding": "valid"}, r"image_conv_padding \('valid'\) must be one of \['same', 'transformers'\]"),
        ({"image_position_channels": 0}, r"image_position_channels \(0\) must be a positive integer"),
        ({"image_position_projection_channels": 2.5}, r"image_position_projection_channels \(2.5\) must be a positive"),
        ({"image_position_channels": 16}, r"image_position_channels \(16\) .* needs image_position_encoding='learned'"),
    ],
)
def test_config_rejects_bad_image_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_image_config(**overrides)


def test_adapter_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"preprocessing \('crop'\) must be one of"):
        ImageInputAdapter((8, 8, 3), preprocessing="crop")
    with pytest.raises(ValueError, match=r"spatial_downsample \(8\) must be a power of 4"):
        ImageInputAdapter((8, 8, 3), preprocessing="conv", spatial_downsample=8)
    with pytest.raises(ValueError, match=r"image size \(4, 8\) is too small for 'conv' preprocessing with conv_pa"):
        ImageInputAdapter((4, 8, 3), preprocessing="conv", conv_padding="transformers")
    with pytest.raises(ValueError, match=r"num_position_projection_channels \(0\) must be a positive integer"):
        ImageInputAdapter((8, 8, 3), num_position_projection_channels=0)
    adapter = ImageInputAdapter((8, 8, 3), preprocessing="patches", spatial_downsample=4)
    with pytest.raises(ValueError, match=r"image size \(6, 8\) must be divisible by spatial_downsample \(4\)"):
        adapter(torch.randn(1, 6, 8, 3))


# --------------------------------------------------------------------------------------------------
# PerceiverImageProcessor
# --------------------------------------------------------------------------------------------------


def test_processor_for_grayscale_model_on_mnist_images() -> None:
    images, _ = mnist_sample(n=3)
    config = tiny_image_config(image_size=[28, 28], num_channels=1)
    processor = PerceiverImageProcessor.from_perceiver_config(config)
    assert processor.do_convert_grayscale and not processor.do_convert_rgb
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 1, 28, 28) and pixel_values.dtype == torch.float32
    # rescale to [0, 1], then normalize with mean 0.5 and std 0.5: [-1, 1]
    expected = torch.tensor(np.stack([np.array(image) for image in images]), dtype=torch.float32) / 255 * 2 - 1
    torch.testing.assert_close(pixel_values[:, 0], expected)
    model = PerceiverForImageClassification(config).eval()
    assert model(pixel_values=pixel_values).logits.shape == (3, config.num_labels)


def test_processor_converts_colour_to_grayscale_like_pil() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    processor = PerceiverImageProcessor(
        do_convert_grayscale=True, do_resize=False, do_normalize=False, do_rescale=False
    )
    assert processor.do_convert_rgb is False  # grayscale turns the RGB default off
    expected = np.array(PIL.Image.fromarray(rgb).convert("L"), dtype=np.float32)
    for image in (PIL.Image.fromarray(rgb), rgb, rgb.transpose(2, 0, 1), torch.from_numpy(rgb)):
        pixel_values = processor(image, return_tensors="np")["pixel_values"]
        assert pixel_values.shape == (1, 1, 10, 12) and pixel_values.dtype == np.float32
        np.testing.assert_allclose(pixel_values[0, 0], expected, atol=1.0)  # PIL rounds with integer weights


def test_processor_for_rgb_model_resizes_and_converts_grayscale_to_rgb() -> None:
    images, _ = mnist_sample(n=2)
    config = tiny_image_config(image_size=[8, 6], num_channels=3)
    processor = PerceiverImageProcessor.from_perceiver_config(config)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 8, 6)
    torch.testing.assert_close(pixel_values[:, 0] * processor.image_std[0] + processor.image_mean[0],
                               pixel_values[:, 1] * processor.image_std[1] + processor.image_mean[1])  # fmt: skip
    # call-time options override the saved ones
    assert processor(images, size={"height": 4, "width": 4}, return_tensors="pt")["pixel_values"].shape == (2, 3, 4, 4)


def test_processor_rejects_both_conversions() -> None:
    with pytest.raises(ValueError, match="do_convert_grayscale=True and do_convert_rgb=True exclude each other"):
        PerceiverImageProcessor(do_convert_grayscale=True, do_convert_rgb=True)
    images, _ = mnist_sample(n=1)
    with pytest.raises(ValueError, match="exclude each other"):
        PerceiverImageProcessor()(images, do_convert_grayscale=True)


@pytest.mark.parametrize("height, width", [(300, 400), (500, 333), (256, 256), (37, 41)])
def test_processor_center_crop_matches_transformers_perceiver_processor(height: int, width: int) -> None:
    # transformers' processor crops the central 224/256 of the shorter side, then resizes (bicubic).
    from transformers.models.perceiver.image_processing_pil_perceiver import PerceiverImageProcessorPil

    theirs = PerceiverImageProcessorPil()
    ours = PerceiverImageProcessor(do_center_crop=True, resample=PIL.Image.Resampling.BICUBIC)
    rng = np.random.default_rng(height)
    channels_last = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for image in (PIL.Image.fromarray(channels_last), channels_last, np.moveaxis(channels_last, -1, 0)):
        expected = theirs(images=[image], return_tensors="pt")["pixel_values"]
        actual = ours(images=[image], return_tensors="pt")["pixel_values"]
        assert actual.shape == (1, 3, 224, 224)
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    # The crop is relative: without it the same image is squeezed, not cropped, into 224x224.
    uncropped = PerceiverImageProcessor(resample=PIL.Image.Resampling.BICUBIC)(images=[channels_last])
    assert not np.allclose(uncropped["pixel_values"][0], expected[0].numpy())


def test_processor_reads_transformers_style_preprocessor_config(tmp_path: Path) -> None:
    # The preprocessor_config.json of DeepMind's vision checkpoints: integer sizes, bicubic (3).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PerceiverImageProcessor", "crop_size": 256, "size": 224, "resample": 3,
        "do_center_crop": True, "do_resize": True, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }))  # fmt: skip
    processor = PerceiverImageProcessor.from_pretrained(tmp_path)
    assert processor.do_center_crop and processor.crop_size.height == 256 and processor.size.width == 224
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    side = int(224 / 256 * 90)  # 78: the crop is square, a ratio of the shorter side
    top, left = (120 - side) // 2, (90 - side) // 2
    cropped = image.crop((left, top, left + side, top + side))
    torch.testing.assert_close(
        processor(image, return_tensors="pt")["pixel_values"],
        processor(cropped, do_center_crop=False, return_tensors="pt")["pixel_values"],
    )


def test_processor_round_trip_through_auto_image_processor(tmp_path: Path) -> None:
    config = tiny_image_config(image_size=[12, 10], num_channels=1)
    processor = PerceiverImageProcessor.from_perceiver_config(config, image_mean=[0.1307], image_std=[0.3081])
    processor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "PerceiverImageProcessor" and saved["do_convert_grayscale"] is True
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is PerceiverImageProcessor
    images, _ = mnist_sample(n=2)
    torch.testing.assert_close(
        loaded(images, return_tensors="pt")["pixel_values"], processor(images, return_tensors="pt")["pixel_values"]
    )


# --------------------------------------------------------------------------------------------------
# pipeline("image-classification")
# --------------------------------------------------------------------------------------------------


def test_image_classification_pipeline_on_mnist_images(tmp_path: Path) -> None:
    names = [f"digit {i}" for i in range(10)]
    config = tiny_image_config(
        image_size=[28, 28], num_channels=1, num_labels=10, id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )  # fmt: skip
    model = PerceiverForImageClassification(config).eval()
    processor = PerceiverImageProcessor.from_perceiver_config(config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    assert type(classifier.image_processor) is PerceiverImageProcessor
    images, _ = mnist_sample(n=3)
    predictions = classifier(images, top_k=10)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    for prediction, row in zip(predictions, logits.softmax(-1), strict=True):
        assert sorted(p["label"] for p in prediction) == sorted(names)
        assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)
        # Each score is the model's softmax probability of that class, best first.
        for p in prediction:
            assert p["score"] == pytest.approx(row[names.index(p["label"])].item(), abs=1e-5)
        assert [p["score"] for p in prediction] == sorted((p["score"] for p in prediction), reverse=True)


# --------------------------------------------------------------------------------------------------
# examples/run_image_classification.py
# --------------------------------------------------------------------------------------------------

SCRIPT = REPO_ROOT / "examples" / "run_image_classification.py"
# A tiny model on 48 shipped MNIST training images (6 batches) and 16 test images.
QUICK = [
    "--max_train_samples", "48", "--max_eval_samples", "16", "--batch_size", "8", "--lr_scheduler", "constant",
    "--logging_steps", "2", "--num_frequency_bands", "4", "--num_latents", "8", "--d_latents", "16",
    "--num_layers", "2", "--num_self_attention_layers_per_block", "1", "--num_cross_attention_heads", "1",
    "--num_self_attention_heads", "2", "--predict_samples", "2",
]  # fmt: skip


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *QUICK, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"run_image_classification.py {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


def test_script_trains_saves_and_resumes_exactly(tmp_path: Path) -> None:
    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    common = ["--max_steps", "4", "--checkpointing_steps", "2", "--augment", "--dropout", "0.1"]
    result = run_script(*common, "--output_dir", str(run_dir))

    config = json.loads((run_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}  # MNIST's ClassLabel names
    assert (
        config["input_adapter_config"]["image_size"] == [28, 28] and config["input_adapter_config"]["num_channels"] == 1
    )
    assert json.loads((run_dir / "preprocessor_config.json").read_text())["do_convert_grayscale"] is True
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 1.0 and np.isfinite(results["loss"])
    assert "Predictions of pipeline('image-classification'" in result.stdout
    assert list((run_dir / "runs").iterdir()), "TensorBoard logs are missing"
    assert (run_dir / "checkpoints" / "step_2" / "preprocessor_config.json").is_file()

    # Resuming from step 2 gives exactly the same weights: same batches, augmentations and dropout.
    run_script(
        *common, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", str(run_dir / "checkpoints" / "step_2")
    )
    weights, resumed = load_file(run_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[key], resumed[key]) for key in weights)

    classifier = pipeline("image-classification", model=str(run_dir), device="cpu")
    images, _ = mnist_sample(n=1)
    assert classifier(images[0])[0]["label"] in {str(i) for i in range(10)}


def test_script_trains_the_original_api_model(tmp_path: Path, script_module) -> None:
    run_script("--max_steps", "2", "--model_api", "original", "--output_dir", str(tmp_path))
    meta = json.loads((tmp_path / script_module.ORIGINAL_API_FILE).read_text())
    assert meta["id2label"]["3"] == "3"
    model = script_module.OriginalAPIClassifier(**meta["arguments"])
    missing, unexpected = model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not missing and not unexpected
    assert AutoImageProcessor.from_pretrained(tmp_path).do_convert_grayscale


@pytest.fixture(scope="module")
def script_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run_image_classification
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return run_image_classification


def test_both_model_apis_build_the_same_architecture(script_module) -> None:
    args = script_module.parse_cli([*QUICK, "--num_channels", "1", "--image_size", "28", "28"])
    names = [str(i) for i in range(10)]
    hf_model = PerceiverForImageClassification(script_module.build_config(args, names))
    original = script_module.OriginalAPIClassifier.from_args(args, len(names))
    hf_shapes = sorted(tuple(p.shape) for p in hf_model.parameters())
    assert hf_shapes == sorted(tuple(p.shape) for p in original.parameters())
    logits = original(torch.randn(2, 1, 28, 28), labels=torch.tensor([1, 2]))
    assert logits.logits.shape == (2, 10) and logits.loss > 0


def test_script_loads_an_image_folder(tmp_path: Path, script_module) -> None:
    images, labels = mnist_sample(n=8)
    for split, rows in (("train", range(6)), ("test", range(6, 8))):
        for i in rows:
            folder = tmp_path / split / f"class_{labels[i] % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i}.png")
    args = script_module.parse_cli(["--image_folder", str(tmp_path)])
    raw = script_module.load_images(args)
    assert len(raw["train"]) == 6 and len(raw["validation"]) == 2
    assert raw["train"].features["label"].names == ["class_0", "class_1"]


def test_random_affine_is_identity_without_motion_and_moves_content(script_module) -> None:
    images = torch.zeros(2, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 1.0
    identity = script_module.random_affine(images, 0.0, 0.0, 0.0)
    torch.testing.assert_close(identity, images)
    moved = script_module.random_affine(images, 10.0, 0.1, 0.1)
    assert moved.shape == images.shape and not torch.allclose(moved, images)
    # Border repetition keeps the background value.
    assert moved[:, :, 0, 0].eq(0).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image_folder", "/nonexistent/folder"], "no folder at"),
        (["--image_folder", ".", "--dataset_name", "mnist"], "give only one of --image_folder"),
        (["--num_channels", "2"], "invalid choice"),
    ],
)
def test_script_rejects_bad_options(script_module, capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        script_module.parse_cli(argv)
    assert message in capsys.readouterr().err


def test_config_defaults_keep_old_configs_loading(tmp_path: Path) -> None:
    # A config.json written before the new image fields loads with their defaults (no preprocessing change).
    config = tiny_image_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("spatial_downsample", "image_projection_channels"):
        saved["input_adapter_config"].pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = PerceiverConfig.from_pretrained(tmp_path)
    assert loaded.spatial_downsample is None and loaded.image_projection_channels is None


def test_script_trains_in_bf16(tmp_path: Path) -> None:
    """`--mixed_precision bf16` (Accelerate's autocast): training and evaluation stay finite, weights stay fp32."""
    from safetensors.torch import load_file

    run_script("--max_steps", "3", "--mixed_precision", "bf16", "--output_dir", str(tmp_path))
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert math.isfinite(results["loss"]) and 0.0 <= results["accuracy"] <= 1.0
    weights = load_file(tmp_path / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


# ---------------------------------------------------------------------------------------------------- mean pooling


def test_mean_pooling_classifies_the_mean_latent_without_a_decoder() -> None:
    """`pooling="mean"` (lucidrains' Perceiver): logits = Linear(LayerNorm(mean of the latents)); no decoder
    parameters, and only the encoder's cross-attention weights are returned."""
    torch.manual_seed(0)
    model = PerceiverForImageClassification(tiny_image_config(pooling="mean")).eval()
    decoder_model = PerceiverForImageClassification(tiny_image_config())
    assert not any(name.startswith("classification_decoder.") for name, _ in model.named_parameters())
    encoder_size = sum(p.numel() for p in model.perceiver.parameters())
    d, k = model.config.d_latents, model.config.num_labels
    assert sum(p.numel() for p in model.parameters()) == encoder_size + 2 * d + d * k + k
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in decoder_model.parameters())

    pixel_values = torch.randn(3, 3, 6, 5)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, output_attentions=True)
        latents = model.perceiver(pixel_values=pixel_values).last_hidden_state  # (B, L, D)
    head = model.mean_pooling_classifier
    expected = head.linear(torch.nn.functional.layer_norm(latents.mean(dim=1), (d,), head.norm.weight, head.norm.bias))
    torch.testing.assert_close(outputs.logits, expected)
    assert len(outputs.cross_attentions) == model.config.num_cross_attention_layers
    assert outputs.cross_attentions[0].shape == (3, 1, model.config.num_latents, 6 * 5)


@pytest.mark.parametrize("pooling", ["latents", "none"])
def test_single_task_heads_reject_the_multimodal_poolings(pooling: str) -> None:
    with pytest.raises(
        ValueError, match=rf"PerceiverForImageClassification takes pooling 'decoder' or 'mean', got '{pooling}'"
    ):
        PerceiverForImageClassification(tiny_image_config(pooling=pooling))
    with pytest.raises(ValueError, match=rf"PerceiverForSequenceClassification takes pooling .* got '{pooling}'"):
        PerceiverForSequenceClassification(tiny_text_config(pooling=pooling))


def test_mean_pooling_head_has_lucidrains_perceiver_parameters() -> None:
    """The HF image head built as lucidrains' blocks (GEGLU x4, no q/k/v biases, `pooling="mean"`) has the
    parameter shapes of lucidrains' `Perceiver` classifier (this package's mirror, whose counts equal the
    original's in tests/test_mirror_perceiver_pytorch.py) of the same sizes."""
    from perceiver_hf.perceiver_pytorch import Perceiver

    mirror = Perceiver(num_freq_bands=3, depth=1, max_freq=6.0, input_channels=3, input_axis=2, num_latents=6,
                       latent_dim=16, cross_heads=1, latent_heads=2, cross_dim_head=16, latent_dim_head=8,
                       num_classes=10, self_per_cross_attn=2)  # fmt: skip
    config = tiny_image_config(
        num_frequency_bands=3, num_self_attention_heads=2, cross_attention_qk_channels=16,
        cross_attention_v_channels=16, self_attention_qk_channels=16, self_attention_v_channels=16,
        hidden_act="geglu", cross_attention_widening_factor=4, self_attention_widening_factor=4, qkv_bias=False,
        pooling="mean", num_labels=10,
    )  # fmt: skip
    head = PerceiverForImageClassification(config)
    assert sorted(tuple(p.shape) for p in head.parameters()) == sorted(tuple(p.shape) for p in mirror.parameters())
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in mirror.parameters()) == 13_324
