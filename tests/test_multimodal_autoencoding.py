"""Multimodal autoencoding: parity with transformers, chunked decoding, save/load, training, errors, processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, Trainer, TrainingArguments

from perceiver_hf import (
    AutoModelForMultimodalAutoencoding,
    ModalitySpec,
    PerceiverConfig,
    PerceiverForMultimodalAutoencoding,
    PerceiverModel,
    PerceiverMultimodalAutoencodingProcessor,
)
from perceiver_hf.convert import convert_transformers_perceiver

IMAGE = {"name": "image", "channels": 1, "num_axes": 3, "num_freq_bands": 3, "max_freq": [2, 8, 8],
         "patch_size": [1, 4, 4]}  # fmt: skip
AUDIO = {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": 4, "max_freq": 32.0, "patch_size": 8}
LABEL = {"name": "label", "channels": 4, "num_axes": 1, "num_freq_bands": 0, "max_freq": 1.0, "one_hot": True,
         "mask_token": True}  # fmt: skip
OUTPUTS = [
    {"name": "image", "shape": [2, 8, 8]},
    {"name": "audio", "shape": [32], "patch_size": 4, "loss_weight": 2.0},
    {"name": "label", "query_channels": 8, "loss_weight": 0.5},
]


def tiny_config(**kwargs) -> PerceiverConfig:
    settings = dict(
        input_adapter="multimodal",
        modalities=[IMAGE, AUDIO, LABEL],
        modality_encoding="concat",
        modality_padding=2,
        autoencoding_outputs=OUTPUTS,
        autoencoding_output_channels=12,
        num_latents=6,
        d_latents=16,
        num_self_attention_layers_per_block=2,
        num_self_attention_heads=2,
        initializer_range=0.3,  # outputs well above float noise, so that equalities and differences mean something
    )
    return PerceiverConfig(**(settings | kwargs))


def tiny_inputs(batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 2, 8, 8, 1, generator=g),
        "audio": torch.rand(batch_size, 32, generator=g) * 2 - 1,
        "label": torch.arange(batch_size) % 4,
    }


@pytest.fixture(scope="module")
def model() -> PerceiverForMultimodalAutoencoding:
    torch.manual_seed(0)
    return PerceiverForMultimodalAutoencoding(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------------- parity


def _transformers_model(num_frames, image_size, samples_per_patch, audio_samples_per_frame, num_labels, **kwargs):
    from transformers import PerceiverConfig as HFConfig
    from transformers import PerceiverForMultimodalAutoencoding as HFModel

    config = HFConfig(
        num_frames=num_frames,
        image_size=image_size,
        samples_per_patch=samples_per_patch,
        audio_samples_per_frame=audio_samples_per_frame,
        output_shape=[1, num_frames, image_size, image_size],
        num_labels=num_labels,
        **({"num_cross_attention_heads": 1} | kwargs),
    )
    torch.manual_seed(0)
    hf = HFModel(config).eval()
    with torch.no_grad():  # weights larger than the initialisation's, so that every path moves the outputs
        for i, parameter in enumerate(hf.parameters()):
            parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    return hf


# Tiny configurations (transformers fixes the Fourier bands: 32 per video axis, 192 for audio). Its preprocessor drops
# the time axis of one-frame videos, so every video has 2 or more frames.
PARITY_CONFIGS = {
    "two_frames": dict(num_frames=2, image_size=8, samples_per_patch=4, audio_samples_per_frame=8, num_labels=5,
                       _label_trainable_num_channels=24, output_num_channels=16, num_latents=6, d_latents=16,
                       num_blocks=1, num_self_attends_per_block=2, num_self_attention_heads=2),
    "wide_latents_two_blocks": dict(num_frames=4, image_size=12, samples_per_patch=8, audio_samples_per_frame=16,
                                    num_labels=7, _label_trainable_num_channels=40, output_num_channels=24,
                                    num_latents=8, d_latents=32, num_blocks=2, num_self_attends_per_block=1,
                                    num_self_attention_heads=4),
    "wide_label_query": dict(num_frames=2, image_size=4, samples_per_patch=2, audio_samples_per_frame=6,
                             num_labels=3, _label_trainable_num_channels=500, output_num_channels=8, num_latents=4,
                             d_latents=8, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=1),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_conversion_matches_transformers_on_subsampled_points(name: str) -> None:
    hf = _transformers_model(**PARITY_CONFIGS[name])
    ours, processor = convert_transformers_perceiver(hf)
    c = hf.config
    frames, side, samples = c.num_frames, c.image_size, c.num_frames * c.audio_samples_per_frame
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, frames, 3, side, side, generator=g)  # transformers' layout (B, T, C, H, W)
    audio = torch.randn(2, samples, 1, generator=g)
    label = torch.nn.functional.one_hot(torch.tensor([0, 2]), c.num_labels).float()
    points = {
        "image": torch.arange(3, frames * side * side, 3),
        "audio": torch.arange(1, samples // c.samples_per_patch, 2),
    }
    with torch.no_grad():
        expected = hf(inputs={"image": video, "audio": audio, "label": label},
                      subsampled_output_points=points | {"label": None}).logits  # fmt: skip
        # Ours takes channels-last frames; transformers always masks the label, ours when it is left out.
        got = ours(inputs={"image": video.permute(0, 1, 3, 4, 2), "audio": audio}, output_points=points).logits
        masked = ours(inputs={"image": video.permute(0, 1, 3, 4, 2), "audio": audio, "label": label},
                      masked={"label": True}, output_points=points).logits  # fmt: skip
    assert got["image"].shape == expected["image"].shape == (2, points["image"].numel(), 3)
    diffs = {
        "image": (got["image"] - expected["image"]).abs().max().item(),
        "audio": (got["audio"].reshape(2, -1) - expected["audio"]).abs().max().item(),
        "label": (got["label"] - expected["label"]).abs().max().item(),
    }
    print(f"{name}: max abs diff {diffs}")
    assert max(diffs.values()) < 1e-4, diffs
    assert expected["image"].abs().max() > 0.1  # outputs large enough for the tolerance to mean something
    for key in got:
        torch.testing.assert_close(masked[key], got[key], atol=1e-6, rtol=0)
    assert processor.num_frames == frames and processor.num_audio_samples == samples


# ---------------------------------------------------------------------------------------------------- decoding


def test_chunked_decoding_equals_one_shot_decoding(model: PerceiverForMultimodalAutoencoding) -> None:
    inputs = tiny_inputs()
    with torch.no_grad():
        full = model(inputs=inputs)
    assert full.reconstructions["image"].shape == (3, 2, 8, 8, 1)
    assert full.reconstructions["audio"].shape == (3, 32) and full.reconstructions["label"].shape == (3, 4)
    for num_chunks in (1, 3, 7):
        chunked = model.reconstruct(inputs, num_chunks=num_chunks)
        for key, value in full.reconstructions.items():
            torch.testing.assert_close(chunked[key], value, atol=1e-5, rtol=0)
    # A subset of points decodes to the matching slice of the full decoding.
    points = {"image": torch.tensor([0, 5, 127, 64]), "audio": torch.tensor([7, 2])}
    with torch.no_grad():
        subset = model(inputs=inputs, output_points=points)
    assert subset.reconstructions is None and subset.logits["image"].shape == (3, 4, 1)
    torch.testing.assert_close(subset.logits["image"], full.logits["image"][:, points["image"]], atol=1e-5, rtol=0)
    torch.testing.assert_close(subset.logits["audio"], full.logits["audio"][:, points["audio"]], atol=1e-5, rtol=0)
    # The audio output patches reassemble in time order: point 1 holds samples 4..7.
    torch.testing.assert_close(full.reconstructions["audio"][:, 4:8], full.logits["audio"][:, 1], atol=0, rtol=0)


def test_left_out_label_is_masked(model: PerceiverForMultimodalAutoencoding) -> None:
    inputs = tiny_inputs()
    without = {k: v for k, v in inputs.items() if k != "label"}
    with torch.no_grad():
        left_out = model(inputs=without).logits["label"]
        masked = model(inputs=inputs, masked={"label": True}).logits["label"]
        other_label_masked = model(inputs=inputs | {"label": (inputs["label"] + 1) % 4}, masked={"label": True})
        visible = model(inputs=inputs).logits["label"]
    torch.testing.assert_close(left_out, masked, atol=1e-6, rtol=0)
    torch.testing.assert_close(other_label_masked.logits["label"], masked, atol=1e-6, rtol=0)
    assert (visible - masked).abs().max() > 1e-4  # a visible label does reach the output


def test_mask_prob_masks_at_random_in_training_only() -> None:
    config = tiny_config(modalities=[IMAGE, AUDIO, LABEL | {"mask_prob": 0.5}])
    torch.manual_seed(0)
    model = PerceiverForMultimodalAutoencoding(config)
    adapter = model.perceiver.input_adapter
    inputs = tiny_inputs(batch_size=64)
    model.train()
    x, _ = adapter(inputs)
    label_rows = x[:, -1]  # the label is the last modality: one position
    is_token = (label_rows - adapter.mask_tokens["label"][0]).abs().amax(-1) < 1e-7
    assert 10 < int(is_token.sum()) < 54
    model.eval()
    x, _ = adapter(inputs)
    assert not ((x[:, -1] - adapter.mask_tokens["label"][0]).abs().amax(-1) < 1e-7).any()


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_and_load_through_the_auto_class(model: PerceiverForMultimodalAutoencoding, tmp_path: Path) -> None:
    processor = PerceiverMultimodalAutoencodingProcessor(
        num_frames=2, image_size=(8, 8), num_audio_samples=32, sampling_rate=8000, num_labels=4
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForMultimodalAutoencoding"].endswith("PerceiverForMultimodalAutoencoding")
    assert saved["autoencoding_outputs"][1]["loss_weight"] == 2.0
    assert saved["input_adapter_config"]["modality_encoding"] == "concat"
    loaded = AutoModelForMultimodalAutoencoding.from_pretrained(tmp_path).eval()
    assert type(loaded) is PerceiverForMultimodalAutoencoding
    loaded_processor = PerceiverMultimodalAutoencodingProcessor.from_pretrained(tmp_path)
    assert loaded_processor.to_dict() == processor.to_dict()
    inputs = tiny_inputs()
    with torch.no_grad():
        for key, value in model(inputs=inputs).reconstructions.items():
            torch.testing.assert_close(loaded(inputs=inputs).reconstructions[key], value, atol=1e-6, rtol=0)
    # `AutoModel` gives the encoder with its multimodal adapter, as for every head of this package.
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is PerceiverModel
    encoder_state = model.perceiver.state_dict()
    assert all(torch.equal(base.state_dict()[name], value) for name, value in encoder_state.items())


def test_spec_defaults_stay_out_of_config_dicts() -> None:
    """Older models' modality dicts read as before: the autoencoding options appear only when set."""
    plain = {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": 4, "max_freq": 32.0}
    assert set(ModalitySpec.from_dict(plain).to_dict()) == set(plain) | {
        "vocab_size", "split_across_layers", "max_length", "patch_size", "spectrogram",
    }  # fmt: skip
    spec = ModalitySpec.from_dict(IMAGE).to_dict()
    assert spec["max_freq"] == [2.0, 8.0, 8.0] and spec["patch_size"] == [1, 4, 4]
    assert ModalitySpec.from_dict(spec) == ModalitySpec.from_dict(IMAGE)


# ---------------------------------------------------------------------------------------------------- training


def test_loss_is_the_weighted_sum_of_the_modalities(model: PerceiverForMultimodalAutoencoding) -> None:
    inputs = tiny_inputs()
    with torch.no_grad():
        out = model(inputs=inputs, labels=inputs)
    assert set(out.losses) == {"image", "audio", "label"}
    expected = out.losses["image"] + 2.0 * out.losses["audio"] + 0.5 * out.losses["label"]
    torch.testing.assert_close(out.loss, expected)
    recon = out.reconstructions
    torch.testing.assert_close(out.losses["image"], ((recon["image"] - inputs["image"]) ** 2).mean())
    torch.testing.assert_close(out.losses["label"], torch.nn.functional.cross_entropy(recon["label"], inputs["label"]))
    # On subsampled points, the loss covers those points only.
    points = {"image": torch.tensor([1, 2]), "audio": torch.tensor([0])}
    with torch.no_grad():
        sub = model(inputs=inputs, labels={"audio": inputs["audio"]}, output_points=points)
    assert set(sub.losses) == {"audio"}
    torch.testing.assert_close(sub.losses["audio"], ((sub.logits["audio"][:, 0] - inputs["audio"][:, :4]) ** 2).mean())


class _Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = tiny_inputs(batch_size=8, seed=3)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: value[i] for name, value in self.data.items()}


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict:
    inputs = {name: torch.stack([e[name] for e in examples]) for name in examples[0]}
    # Modalities as keywords: `Trainer` reads a batch's `inputs` entry as one tensor (to count operations).
    return inputs | {"labels": inputs, "masked": {"label": torch.arange(len(examples)) % 2 == 0}}


def test_trainer_trains_it_and_the_loss_falls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PerceiverForMultimodalAutoencoding(tiny_config())
    batch = _collate([_Pairs()[i] for i in range(8)])
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=3e-3,
        remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=40, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_Pairs(), data_collator=_collate).train()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.7 * before, (before, after)


def test_trainer_trains_it_in_bf16(tmp_path: Path) -> None:
    """`Trainer(bf16=True)` (CPU autocast): finite losses for every modality, fp32 master weights that move."""
    torch.manual_seed(0)
    model = PerceiverForMultimodalAutoencoding(tiny_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, bf16=True,
        remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(), data_collator=_collate)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) >= 0.8 * len(before)
    batch = _collate([_Pairs()[i] for i in range(4)])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and all(torch.isfinite(loss) for loss in outputs.losses.values())


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_modality_is_named(model: PerceiverForMultimodalAutoencoding) -> None:
    inputs = tiny_inputs()
    del inputs["audio"]
    with pytest.raises(ValueError, match=r"inputs lacks modality 'audio': got \['image', 'label'\], expected every"):
        model(inputs=inputs)


def test_mis_shaped_modality_is_named(model: PerceiverForMultimodalAutoencoding) -> None:
    inputs = tiny_inputs()
    with pytest.raises(ValueError, match=r"modality 'image' has axes \(2, 7, 8\), which patches of \(1, 4, 4\)"):
        model(inputs=inputs | {"image": torch.rand(3, 2, 7, 8, 1)})
    with pytest.raises(ValueError, match=r"modality 'label' is one vector of 4 class scores .* got \(3, 5\)"):
        model(inputs=inputs | {"label": torch.rand(3, 5)})
    with pytest.raises(ValueError, match=r"labels\['image'\] must be floats of shape \(batch, 2, 8, 8, 1\) or "
                                         r"\(batch, 2, 8, 8\), got \(3, 2, 8, 4, 1\)"):  # fmt: skip
        model(inputs=inputs, labels={"image": torch.rand(3, 2, 8, 4, 1)})
    with pytest.raises(ValueError, match=r"labels\['label'\] must be class ids of shape \(3,\) .* got \(3, 1\)"):
        model(inputs=inputs, labels={"label": torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"output_points\['audio'\] must index the 8 points .* from 0 to 8"):
        model(inputs=inputs, output_points={"audio": torch.tensor([0, 8])})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(modalities=[IMAGE, AUDIO, LABEL | {"mask_token": False, "mask_prob": 0.2}]),
         r"modality 'label': mask_prob \(0.2\) needs mask_token=true"),
        (dict(modalities=[IMAGE, AUDIO, LABEL | {"num_freq_bands": 2}]),
         r"one_hot inputs are one vector per example: .* num_freq_bands=2"),
        (dict(modalities=[IMAGE | {"max_freq": [2, 8]}, AUDIO, LABEL]),
         r"modality 'image': max_freq \(\[2, 8\]\) must be a positive number or a list of 3"),
        (dict(modality_padding=0), r"modality_encoding='concat' needs modality_padding >= 1 \(got 0\)"),
        (dict(autoencoding_outputs=[{"name": "video", "shape": [2, 8, 8]}]),
         r"autoencoding output 'video': name must be one of the input modalities \['image', 'audio', 'label'\]"),
        (dict(autoencoding_outputs=[{"name": "audio", "shape": [30], "patch_size": 4}]),
         r"autoencoding output 'audio': shape \[30\] must be a multiple of patch_size \[4\]"),
        (dict(autoencoding_outputs=[{"name": "label"}]),
         r"autoencoding output 'label': one-hot outputs need query_channels, a positive integer, got None"),
    ],
)  # fmt: skip
def test_config_errors_name_the_setting(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


# ---------------------------------------------------------------------------------------------------- processor


def test_processor_round_trip(model: PerceiverForMultimodalAutoencoding) -> None:
    processor = PerceiverMultimodalAutoencodingProcessor(
        num_frames=2, image_size=(8, 8), num_audio_samples=32, sampling_rate=8000, num_labels=4, audio_peak=0.5
    )
    frames = [np.full((2, 8, 8, 3), 255, np.uint8), np.zeros((2, 8, 8), np.uint8)]  # RGB -> gray; (T, H, W)
    clips = [np.linspace(-0.1, 0.1, 50, dtype=np.float32), np.ones(10, np.float32) * 0.2]
    batch = processor(videos=frames, audio=clips, labels=[1, 3], sampling_rate=8000, return_targets=True)
    inputs = {name: batch[name] for name in ("image", "audio", "label")}
    assert inputs["image"].shape == (2, 2, 8, 8, 1) and inputs["image"][0].min() == 1 and inputs["image"][1].max() == 0
    assert inputs["audio"].shape == (2, 32)  # cut to 32 samples, or zero-padded
    assert inputs["audio"][1, 10:].abs().max() == 0 and torch.allclose(inputs["audio"][1, :10], torch.tensor(0.5))
    assert inputs["audio"][0].abs().max() == pytest.approx(0.5)  # peak-normalised
    assert inputs["label"].tolist() == [1, 3] and batch["labels"]["label"] is inputs["label"]
    assert set(batch) == {"image", "audio", "label", "labels"}
    with torch.no_grad():
        out = model(**batch)
    raw = processor.post_process(out.reconstructions)
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (2, 2, 8, 8, 1)
    assert raw["audio"].shape == (2, 32) and np.abs(raw["audio"]).max() <= 1
    assert raw["label"].shape == (2,)
    with pytest.raises(ValueError, match=r"sampling_rate \(16000\) differs from the processor's \(8000\)"):
        processor(audio=clips, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"videos\[0\] must have 2 frames, got 3"):
        processor(videos=[np.zeros((3, 8, 8, 1), np.float32)])
