"""Optical flow: parity with transformers' `PerceiverForOpticalFlow`, save/load, processor and tiling, the colour
wheel, the pipeline, training (Trainer and the example script) and clear errors for bad inputs."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, Trainer, TrainingArguments, pipeline
from transformers import PerceiverConfig as TransformersPerceiverConfig
from transformers import PerceiverForOpticalFlow as TransformersPerceiverForOpticalFlow

import perceiver_hf
from perceiver_hf import (
    AutoModelForOpticalFlow,
    PerceiverConfig,
    PerceiverForOpticalFlow,
    PerceiverOpticalFlowProcessor,
    flow_to_color,
)
from perceiver_hf.convert import convert_transformers_perceiver
from perceiver_hf.modeling_optical_flow import FlowOutputAdapter
from perceiver_hf.modeling_perceiver import PerceiverDecoder
from perceiver_hf.processing_optical_flow import read_flo, tile_positions, tile_weights, write_flo

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES_DIR))
try:
    run_optical_flow = importlib.import_module("run_optical_flow")
finally:
    sys.path.remove(str(EXAMPLES_DIR))

TOLERANCE = 1e-4  # max absolute flow difference, fp32
TINY = dict(input_adapter="flow", flow_image_size=[8, 12], num_frequency_bands=4, flow_projection_channels=16,
            num_latents=8, d_latents=32, num_self_attention_layers_per_block=2, num_self_attention_heads=2,
            decoder_qk_channels=16)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Large random weights, so that a wrong mapping changes the flow far beyond the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def colab_patches(frames: torch.Tensor) -> torch.Tensor:
    """The input of transformers' flow model as its docs (DeepMind's colab) build it: `extract_image_patches` of
    3 x 3 with TensorFlow "SAME" padding, `(B, 2, 3, H, W)` -> `(B, 2, 27, H, W)`. Written independently of ours."""
    b, t, c, h, w = frames.shape
    x = F.pad(frames.reshape(b * t, c, h, w), (1, 1, 1, 1))
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1).permute(0, 4, 5, 1, 2, 3).contiguous()  # (BT, 3, 3, C, H, W)
    return patches.view(b, t, 9 * c, h, w)


PARITY_CONFIGS = {
    "one_block": dict(num_latents=8, d_latents=32, num_blocks=1, num_self_attends_per_block=2,
                      num_self_attention_heads=2, num_cross_attention_heads=1, train_size=[8, 12]),
    "qk_v_widening_two_blocks": dict(num_latents=16, d_latents=48, num_blocks=2, num_self_attends_per_block=1,
                                     num_self_attention_heads=4, num_cross_attention_heads=2, qk_channels=64,
                                     v_channels=48, cross_attention_widening_factor=2,
                                     self_attention_widening_factor=2, train_size=[12, 8]),
    "no_query_residual_7_heads": dict(num_latents=4, d_latents=28, num_blocks=1, num_self_attends_per_block=3,
                                      num_self_attention_heads=7, num_cross_attention_heads=7,
                                      use_query_residual=False, train_size=[6, 10]),
}  # fmt: skip


@pytest.mark.parametrize("overrides", PARITY_CONFIGS.values(), ids=PARITY_CONFIGS.keys())
def test_converted_flow_matches_transformers(overrides):
    reference = _randomize(TransformersPerceiverForOpticalFlow(TransformersPerceiverConfig(**overrides)), seed=0)
    model, processor = convert_transformers_perceiver(reference)
    assert isinstance(model, PerceiverForOpticalFlow)
    assert isinstance(processor, PerceiverOpticalFlowProcessor) and processor.flow_scale_factor == 20.0
    assert processor.tile_size == overrides["train_size"]

    frames = torch.randn(2, 2, 3, *overrides["train_size"], generator=torch.Generator().manual_seed(1))
    patches = colab_patches(frames)  # what transformers' model takes
    with torch.no_grad():
        expected = reference(inputs=patches).logits
        from_patches = model(inputs=patches).logits
        from_frames = model(pixel_values=frames).logits  # our adapter extracts the patches itself
    assert expected.shape == (2, *overrides["train_size"], 2)
    assert expected.abs().max() > 0.02  # the comparison below is meaningful (the output is divided by 100)
    assert (from_patches - expected).abs().max() < TOLERANCE
    assert (from_frames - expected).abs().max() < TOLERANCE


def test_conversion_round_trips_through_auto_class(tmp_path):
    reference = _randomize(TransformersPerceiverForOpticalFlow(TransformersPerceiverConfig(
        **PARITY_CONFIGS["one_block"])), seed=3)  # fmt: skip
    reference.save_pretrained(tmp_path / "transformers")
    perceiver_hf.convert.main([str(tmp_path / "transformers"), str(tmp_path / "ours")])
    loaded = AutoModelForOpticalFlow.from_pretrained(tmp_path / "ours").eval()
    frames = torch.randn(1, 2, 3, 8, 12)
    with torch.no_grad():
        assert (
            loaded(pixel_values=frames).logits - reference(inputs=colab_patches(frames)).logits
        ).abs().max() < TOLERANCE
    assert PerceiverOpticalFlowProcessor.from_pretrained(tmp_path / "ours").flow_scale_factor == 20.0


def test_save_load_auto_classes(tmp_path):
    model = _randomize(PerceiverForOpticalFlow(PerceiverConfig(**TINY)), seed=1)
    model.save_pretrained(tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    assert '"flow_image_size"' in config_json and '"AutoModelForOpticalFlow"' in config_json
    loaded = AutoModelForOpticalFlow.from_pretrained(tmp_path).eval()
    assert type(loaded) is PerceiverForOpticalFlow
    assert "output_query" not in dict(loaded.named_parameters())  # the decoder is queried by the inputs
    frames = torch.randn(2, 2, 3, 8, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=frames).logits, model(pixel_values=frames).logits, atol=1e-6)
        # AutoModel gives the encoder with its flow adapter (the latents of the same pair).
        base = AutoModel.from_pretrained(tmp_path).eval()
        latents = base(inputs=frames).last_hidden_state
        assert torch.allclose(latents, model.perceiver(inputs=frames).last_hidden_state)
        # Channels-last frames give the same flow; other sizes than the training size work (Fourier features).
        assert torch.allclose(
            model(pixel_values=frames.permute(0, 1, 3, 4, 2)).logits, model(pixel_values=frames).logits
        )
        assert model(pixel_values=torch.randn(1, 2, 3, 5, 17)).logits.shape == (1, 5, 17, 2)


def test_core_additions_adapted_inputs_and_decoder_without_learned_queries():
    model = _randomize(PerceiverForOpticalFlow(PerceiverConfig(**TINY)), seed=2)
    frames = torch.randn(2, 2, 3, 8, 12)
    encoder = model.perceiver.encoder
    with torch.no_grad():
        adapted = encoder(encoder.input_adapter(frames), inputs_are_adapted=True).last_hidden_state
        assert torch.equal(adapted, encoder(frames).last_hidden_state)
    decoder = PerceiverDecoder(model.config, FlowOutputAdapter(4, 8), use_query_residual=False, learned_queries=False)
    assert decoder.output_query is None and not any("output_query" in n for n, _ in decoder.named_parameters())
    with pytest.raises(ValueError, match="no learned queries"):
        decoder(torch.randn(1, 8, 32))
    assert decoder(torch.randn(1, 8, 32), output_query=torch.randn(1, 5, 8)).logits.shape == (1, 5, 2)


def test_end_point_error_loss_and_validity_mask():
    model = PerceiverForOpticalFlow(PerceiverConfig(**TINY)).eval()
    frames = torch.randn(1, 2, 3, 8, 12)
    with torch.no_grad():
        flow = model(pixel_values=frames).logits
    target = flow + torch.tensor([3.0, 4.0])  # every vector off by 5 pixels
    loss = model(pixel_values=frames, labels=target).loss
    assert loss.item() == pytest.approx(5.0, abs=1e-4)
    # A validity mask (third channel) leaves the unmasked pixels out of the mean.
    masked = torch.cat([target, torch.ones(1, 8, 12, 1)], dim=-1)
    masked[0, :4, :, :2] += 100.0
    masked[0, :4, :, 2] = 0.0
    assert model(pixel_values=frames, labels=masked).loss.item() == pytest.approx(5.0, abs=1e-4)
    with pytest.raises(ValueError, match=r"labels must have shape .*\(1, 8, 12\).*got \(1, 8, 12, 1\)"):
        model(pixel_values=frames, labels=target[..., :1])


def test_bad_inputs_name_argument_value_and_expectation():
    model = PerceiverForOpticalFlow(PerceiverConfig(**TINY))
    processor = PerceiverOpticalFlowProcessor.from_perceiver_config(model.config)
    with pytest.raises(ValueError, match=r"pixel_values holds 1 frame\(s\) per example \(shape \(2, 1, 3, 8, 12\)\); "
                                         r"optical flow takes 2"):  # fmt: skip
        model(pixel_values=torch.randn(2, 1, 3, 8, 12))
    with pytest.raises(ValueError, match=r"pixel_values of shape \(1, 2, 4, 8, 12\) has no axis of 3 channels"):
        model(pixel_values=torch.randn(1, 2, 4, 8, 12))
    with pytest.raises(ValueError, match=r"pixel_values must be frame pairs of shape .* got \(2, 3, 8, 12\)"):
        model(pixel_values=torch.randn(2, 3, 8, 12))
    with pytest.raises(ValueError, match=r"inputs \(patches\) must have shape \(batch, 2, 27, height, width\).*"
                                         r"got \(1, 2, 9, 8, 12\)"):  # fmt: skip
        model(inputs=torch.randn(1, 2, 9, 8, 12))
    with pytest.raises(ValueError, match="exactly one of pixel_values"):
        model()
    image = np.zeros((8, 12, 3), np.uint8)
    with pytest.raises(ValueError, match=r"the first frame is \(8, 12\) pixels .* the second \(8, 10\); both frames "
                                         r"must be of one size"):  # fmt: skip
        processor((image, np.zeros((8, 10, 3), np.uint8)))
    with pytest.raises(ValueError, match="got only one frame; optical flow needs two"):
        processor({"first": image})
    with pytest.raises(ValueError, match=r"frames must be a pair .* got ndarray of 1 item"):
        processor(image)
    with pytest.raises(
        ValueError, match=r"second frame of shape \(8, 12, 4\) has no axis of 3 channels \(num_channels\)"
    ):
        processor((image, np.zeros((8, 12, 4), np.uint8)))
    with pytest.raises(ValueError, match=r"flow_image_size \(\[8\]\) must be two positive integers"):
        PerceiverConfig(**{**TINY, "flow_image_size": [8]})


def test_processor_scaling_and_tiling():
    processor = PerceiverOpticalFlowProcessor(tile_size=[8, 12], min_overlap=3)
    first = np.full((8, 12, 3), 255, np.uint8)
    pixel_values = processor((first, torch.zeros(3, 8, 12)))["pixel_values"]  # uint8 HWC and float CHW
    assert pixel_values.shape == (1, 2, 3, 8, 12)
    assert pixel_values[0, 0].min() == 1.0 and pixel_values[0, 1].max() == -1.0  # [0, 255] / [0, 1] -> [-1, 1]
    corners = tile_positions((20, 30), (8, 12), min_overlap=3)
    covered = np.zeros((20, 30), bool)
    for y, x in corners:
        covered[y : y + 8, x : x + 12] = True
    assert covered.all() and max(y for y, _ in corners) == 12 and max(x for _, x in corners) == 18  # flush
    assert tile_weights((8, 12))[0, 0] == 1 and tile_weights((8, 12))[4, 6] == 4
    # A flow that is the same everywhere survives the blending unchanged, and each tile lands where it belongs.
    tiles = torch.tensor([[1.0, -2.0]]).expand(len(corners), 8, 12, 2)
    assert np.allclose(processor.combine_tiles(tiles, corners, (20, 30)), [1.0, -2.0])
    ramps = torch.stack([torch.full((8, 12, 2), float(y + x)) for y, x in corners])
    combined = processor.combine_tiles(ramps, corners, (20, 30))
    assert combined[0, 0, 0] == 0.0 and combined[19, 29, 0] == 12 + 18


def test_flow_to_color_middlebury_wheel(tmp_path):
    wheel = perceiver_hf.processing_optical_flow.make_color_wheel()
    assert wheel.shape == (55, 3) and tuple(wheel[0]) == (255, 0, 0)
    flow = np.zeros((3, 4, 2), np.float32)
    flow[0, 0] = (1.0, 0.0)  # right, full magnitude: red
    flow[0, 1] = (-1.0, 0.0)  # left: cyan
    flow[0, 2] = (0.0, 1.0)  # down (image y axis): yellow-green
    flow[0, 3] = (0.5, 0.0)  # right, half magnitude: pink
    color = flow_to_color(flow)
    assert tuple(color[1, 1]) == (255, 255, 255)  # no motion: white
    assert tuple(color[0, 0]) == (255, 0, 0)
    assert color[0, 1, 0] < 30 and color[0, 1, 1] > 200 and color[0, 1, 2] > 200
    assert color[0, 2, 0] > 100 and color[0, 2, 1] > 200 and color[0, 2, 2] < 30
    assert tuple(color[0, 3]) == (255, 127, 127)
    write_flo(tmp_path / "f.flo", flow)
    assert np.array_equal(read_flo(tmp_path / "f.flo"), flow)


def test_pipeline_returns_flow_and_picture(tmp_path):
    model = _randomize(PerceiverForOpticalFlow(PerceiverConfig(**TINY)), seed=4)
    processor = PerceiverOpticalFlowProcessor.from_perceiver_config(model.config, min_overlap=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    flow_pipeline = pipeline("optical-flow", model=str(tmp_path))
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (19, 29, 3), dtype=np.uint8) for _ in range(2))
    result = flow_pipeline((first, second))
    assert result["flow"].shape == (19, 29, 2) and result["image"].size == (29, 19)
    assert np.allclose(result["flow"], processor.predict_flow(model, first, second), atol=1e-5)
    assert np.array_equal(np.asarray(result["image"]), flow_to_color(result["flow"]))
    # At the training size there is one tile: the pipeline's flow is the model's.
    small = flow_pipeline(first[:8, :12], second[:8, :12])["flow"]
    with torch.no_grad():
        direct = model(**processor((first[:8, :12], second[:8, :12]))).logits[0].numpy()
    assert np.allclose(small, direct, atol=1e-6)
    with pytest.raises(ValueError, match="both frames must be of one size"):
        flow_pipeline((first, second[:10]))


def _synthetic(num_pairs: int, seed: int, region=(0.0, 0.75), min_texture=0.0):
    from sklearn.datasets import load_sample_images

    return run_optical_flow.SyntheticFlowDataset(load_sample_images().images, region, (16, 24), num_pairs,
                                                 max_flow=2.0, seed=seed, min_texture=min_texture)  # fmt: skip


def test_synthetic_pairs_have_exact_ground_truth():
    item = _synthetic(4, seed=0)[2]
    first, second = item["pixel_values"]
    flow = item["labels"]
    assert first.shape == (3, 16, 24) and flow.shape == (16, 24, 2) and flow.norm(dim=-1).max() <= 2.0 + 1e-5
    # Sampling the second frame at p + flow(p) gives back the first frame (up to bilinear resampling).
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    grid = torch.stack([(xs + flow[..., 0]) / 23 * 2 - 1, (ys + flow[..., 1]) / 15 * 2 - 1], dim=-1)
    warped = F.grid_sample(second[None], grid[None], align_corners=True)[0]
    inside = (grid.abs() < 0.9).all(-1)
    assert (warped - first).abs().mean(0)[inside].mean() < 0.4 * (second - first).abs().mean(0)[inside].mean()


def test_synthetic_pairs_reject_flat_crops():
    flat = np.full((120, 160, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3)).astype(np.uint8)
    assert run_optical_flow.texture(torch.zeros(3, 16, 24)) == 0.0
    assert run_optical_flow.texture(torch.from_numpy(noise[:16, :24]).permute(2, 0, 1) / 127.5 - 1) > 0.05

    def pairs(photographs, min_texture, region=(0.0, 1.0)):
        return run_optical_flow.SyntheticFlowDataset(photographs, region, (16, 24), 8, max_flow=2.0,
                                                     min_texture=min_texture)  # fmt: skip

    assert pairs([flat], 0.0)[0]["pixel_values"].std() < 1e-6  # no rejection: the flat crop is kept
    with pytest.raises(ValueError, match="reached --min_texture 0.05"):
        pairs([flat], 0.05)[0]
    mixed = pairs([flat, noise], 0.05)  # every pair is drawn from the textured photograph
    assert all(run_optical_flow.texture(mixed[i]["pixel_values"][1]) >= 0.05 for i in range(8))
    # The photographs: the held-out region's pairs have texture too, and keep exact ground truth.
    validation = _synthetic(8, seed=1, region=(0.75, 1.0), min_texture=0.05)
    assert all(run_optical_flow.texture(validation[i]["pixel_values"][1]) >= 0.05 for i in range(8))
    assert _synthetic(2, seed=0, min_texture=0.0)[1]["labels"].equal(_synthetic(2, seed=0)[1]["labels"])


def test_trainer_training_lowers_end_point_error(tmp_path):
    config = PerceiverConfig(**{**TINY, "flow_image_size": [16, 24], "flow_rescale_factor": 1.0})
    model = PerceiverForOpticalFlow(config)
    pairs = _synthetic(8, seed=0)
    batch = torch.utils.data.default_collate([pairs[i] for i in range(8)])

    def epe() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = epe()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=100, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=100, report_to=[],
                             save_strategy="no", use_cpu=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=pairs).train()
    after = epe()
    assert after < 0.75 * before, (before, after)


def test_example_script_trains_and_resumes(tmp_path):
    common_args = ["--image_size", "16", "24", "--num_train_pairs", "64", "--num_validation_pairs", "8",
                   "--batch_size", "8", "--num_latents", "8", "--d_latents", "32", "--num_frequency_bands", "4",
                   "--flow_projection_channels", "16", "--num_self_attention_layers_per_block", "1",
                   "--max_steps", "4", "--eval_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "2",
                   "--lr_scheduler", "constant", "--output_dir"]  # fmt: skip
    run_optical_flow.main([*common_args, str(tmp_path / "full"), "--picture", str(tmp_path / "flow.png")])
    full = torch.load(tmp_path / "full" / "checkpoints" / "step_4" / "optimizer.bin", weights_only=False)
    assert (tmp_path / "flow.png").is_file() and (tmp_path / "full" / "preprocessor_config.json").is_file()
    results = (tmp_path / "full" / "eval_results.json").read_text()
    assert '"zero_flow_epe"' in results and '"epe_ratio"' in results
    # Stop after step 2, resume: the same optimizer state at step 4 as the uninterrupted run.
    run_optical_flow.main([*common_args, str(tmp_path / "half"), "--max_steps", "2"])
    run_optical_flow.main([*common_args, str(tmp_path / "half"), "--resume_from_checkpoint", "latest"])
    resumed = torch.load(tmp_path / "half" / "checkpoints" / "step_4" / "optimizer.bin", weights_only=False)
    for key, value in full["state"].items():
        assert torch.allclose(value["exp_avg"], resumed["state"][key]["exp_avg"], atol=1e-7)
    loaded = AutoModelForOpticalFlow.from_pretrained(tmp_path / "full")
    assert math.isfinite(loaded(**torch.utils.data.default_collate([_synthetic(1, seed=1)[0]])).loss.item())
