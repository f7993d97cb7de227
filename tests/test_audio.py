"""Audio: the waveform input adapter, `PerceiverFeatureExtractor`, `PerceiverForAudioClassification`, the
audio-classification pipeline (arrays and files) and remote-code loading of an audio classifier.

The generic head checks (shapes, loss, eager == SDPA, batch independence, save/load, checkpointing) run on the
audio head through `HEAD_SPECS` in `perceiver_tester.py`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import DATA_DIR
from perceiver_tester import audio_batch, tiny_audio_config, tiny_text_config
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline

from perceiver_hf import (
    AudioInputAdapter,
    PerceiverFeatureExtractor,
    PerceiverForAudioClassification,
    fourier_features,
)
from perceiver_hf.adapters_audio import patch_mask

ATOL = 1e-5


@pytest.fixture(scope="module")
def fsdd_clips() -> tuple[list[np.ndarray], list[int]]:
    """The shipped FSDD training sample (100 clips, 10 per digit) decoded with soundfile: float32 at 8 kHz."""
    table = pq.read_table(DATA_DIR / "fsdd_train.parquet", columns=["audio", "label"]).to_pylist()
    clips = []
    for row in table:
        clip, sampling_rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        assert sampling_rate == 8000
        clips.append(clip)
    return clips, [row["label"] for row in table]


# ---------------------------------------------------------------------------------------------------
# Input adapter
# ---------------------------------------------------------------------------------------------------


def test_adapter_groups_samples_into_patches_with_fourier_positions() -> None:
    adapter = AudioInputAdapter(max_samples=40, patch_size=4, num_frequency_bands=3)
    waveform = torch.randn(2, 30)
    features, mask = adapter(waveform)
    assert mask is None
    assert adapter.num_input_channels == 4 + (2 * 3 + 1)
    assert features.shape == (2, 8, adapter.num_input_channels)  # ceil(30 / 4) patches
    # Patch k holds samples 4k..4k+3 (the last one zero-completed), then the Fourier features of position k on
    # the fixed grid of ceil(40 / 4) = 10 positions.
    padded = torch.nn.functional.pad(waveform, (0, 2))
    torch.testing.assert_close(features[..., :4], padded.view(2, 8, 4))
    expected_positions = fourier_features((10,), 3, max_frequencies=(10,))[:8]
    torch.testing.assert_close(features[0, :, 4:], expected_positions)


def test_spectrogram_patches_hold_the_log_power_spectrum() -> None:
    adapter = AudioInputAdapter(max_samples=64, patch_size=16, num_frequency_bands=2, preprocessing="spectrogram")
    assert adapter.num_input_channels == 9 + 5
    waveform = torch.randn(2, 40)
    features, _ = adapter(waveform)
    frames = torch.nn.functional.pad(waveform, (0, 8)).view(2, 3, 16)
    expected = torch.log1p(torch.fft.rfft(frames, dim=-1).abs() ** 2)
    torch.testing.assert_close(features[..., :9], expected)
    with pytest.raises(ValueError, match=r"preprocessing \('mel'\)"):
        AudioInputAdapter(max_samples=64, preprocessing="mel")


def test_adapter_projection_and_multichannel_audio() -> None:
    adapter = AudioInputAdapter(max_samples=32, patch_size=8, num_audio_channels=2, num_projection_channels=5)
    features, _ = adapter(torch.randn(3, 20, 2))  # channels-last stereo
    assert features.shape == (3, 3, 5 + adapter.position_encoding.num_channels)
    with pytest.raises(ValueError, match=r"\(batch, samples, 2\)"):
        adapter(torch.randn(3, 20))


def test_adapter_features_do_not_depend_on_the_batch_padding() -> None:
    """Positions sit on a fixed grid: a clip's features are the same alone as in a longer padded batch, and
    the values of padded samples (even inside its last, partly real patch) never matter."""
    adapter = AudioInputAdapter(max_samples=64, patch_size=4, num_frequency_bands=3)
    clip = torch.randn(1, 18)
    alone, _ = adapter(clip)
    batch = torch.randn(2, 40)  # garbage after the clip's 18 samples
    batch[0, :18] = clip
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :18] = 1
    mask[1] = 1
    in_batch, position_mask = adapter(batch, mask)
    torch.testing.assert_close(in_batch[0, :5], alone[0])
    assert position_mask[0].tolist() == [True] * 5 + [False] * 5
    assert position_mask[1].all()


def test_patch_mask_marks_patches_with_any_real_sample() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert patch_mask(mask, 4).tolist() == [[True, True, False], [True, False, False]]


@pytest.mark.parametrize(
    ("waveform", "mask", "message"),
    [
        (torch.randn(2, 65), None, r"65 samples, more than the model's max_audio_samples \(64\)"),
        (torch.randint(0, 5, (2, 10)), None, "floating point waveform"),
        (torch.randn(2, 10, 3), None, r"\(batch, samples\) or \(batch, samples, 1\)"),
        (torch.randn(2, 10), torch.ones(2, 9), r"attention_mask must have the shape of the waveform"),
    ],
)
def test_adapter_rejects_bad_inputs(waveform: torch.Tensor, mask: torch.Tensor | None, message: str) -> None:
    adapter = AudioInputAdapter(max_samples=64, patch_size=4, num_frequency_bands=3)
    with pytest.raises(ValueError, match=message):
        adapter(waveform, mask)


def test_adapter_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"patch_size \(0\)"):
        AudioInputAdapter(max_samples=64, patch_size=0)
    with pytest.raises(ValueError, match=r"max_frequency \(-1.0\)"):
        AudioInputAdapter(max_samples=64, max_frequency=-1.0)


def test_config_rejects_a_patch_longer_than_the_audio() -> None:
    with pytest.raises(ValueError, match=r"audio_patch_size \(100\) must not exceed max_audio_samples \(64\)"):
        tiny_audio_config(audio_patch_size=100)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_classifier_ignores_padding(attn_implementation: str) -> None:
    """Padding, whatever its values, leaves a clip's logits unchanged."""
    torch.manual_seed(0)
    model = PerceiverForAudioClassification(tiny_audio_config(attn_implementation=attn_implementation)).eval()
    short = audio_batch(model.config, lengths=[7, 4], seed=3)
    padded = {key: torch.nn.functional.pad(value, (0, 20)) for key, value in short.items()}
    padded["input_values"][:, 28:] = torch.randn(2, 20)  # real-looking noise in the padding
    padded["input_values"][1, 16:28] = torch.randn(12)
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**short).logits, atol=ATOL, rtol=0)


def test_classifier_requires_audio_config_and_input() -> None:
    with pytest.raises(ValueError, match="input_adapter='audio'"):
        PerceiverForAudioClassification(tiny_text_config())
    model = PerceiverForAudioClassification(tiny_audio_config())
    with pytest.raises(ValueError, match="input_values is required"):
        model(attention_mask=torch.ones(1, 4))


def test_short_training_run_fits_fsdd_clips(fsdd_clips) -> None:
    """A tiny classifier fits 10 real spoken digits (one per class) in 40 AdamW steps (spectrogram patches and a
    0.1 initialisation, the settings of the FSDD example)."""
    clips, labels = fsdd_clips
    picked = [labels.index(digit) for digit in range(10)]
    config = tiny_audio_config(
        max_audio_samples=8000, audio_patch_size=128, audio_preprocessing="spectrogram", num_labels=10,
        d_latents=32, num_latents=8, initializer_range=0.1,
    )  # fmt: skip
    feature_extractor = PerceiverFeatureExtractor.from_perceiver_config(config)
    batch = feature_extractor([clips[i] for i in picked], sampling_rate=8000, return_tensors="pt")
    targets = torch.tensor([labels[i] for i in picked])
    torch.manual_seed(0)
    model = PerceiverForAudioClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


# ---------------------------------------------------------------------------------------------------
# Feature extractor
# ---------------------------------------------------------------------------------------------------


def test_feature_extractor_normalises_pads_and_masks() -> None:
    extractor = PerceiverFeatureExtractor(sampling_rate=8000)
    clips = [np.linspace(-1, 3, 50), 5.0 + 2.0 * np.random.default_rng(0).standard_normal(80)]
    batch = extractor(clips, sampling_rate=8000, return_tensors="pt")
    assert batch["input_values"].shape == (2, 80) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].tolist() == [[1] * 50 + [0] * 30, [1] * 80]
    for row, length in enumerate([50, 80]):
        real = batch["input_values"][row, :length].double()
        assert abs(real.mean().item()) < 1e-5 and abs(real.std(unbiased=False).item() - 1) < 1e-3
        assert (batch["input_values"][row, length:] == 0).all()
    raw = extractor(clips, sampling_rate=8000, do_normalize=False, return_tensors="np")
    np.testing.assert_allclose(raw["input_values"][0, :50], clips[0], rtol=1e-6)


def test_feature_extractor_checks_the_sampling_rate() -> None:
    extractor = PerceiverFeatureExtractor(sampling_rate=8000)
    with pytest.raises(ValueError, match=r"sampling_rate \(16000\) differs from the 8000 Hz"):
        extractor(np.zeros(10), sampling_rate=16000)


def test_feature_extractor_truncates_to_max_length() -> None:
    extractor = PerceiverFeatureExtractor(sampling_rate=8000, max_length=30)
    batch = extractor([np.arange(50.0), np.arange(10.0)], sampling_rate=8000, return_tensors="np")
    assert batch["input_values"].shape == (2, 30)
    # Normalised after cutting: the kept samples have unit variance.
    assert abs(batch["input_values"][0].std() - 1) < 1e-3
    full = extractor([np.arange(50.0)], sampling_rate=8000, truncation=False, return_tensors="np")
    assert full["input_values"].shape == (1, 50)
    padded = extractor([np.arange(10.0)], sampling_rate=8000, padding="max_length", return_tensors="np")
    assert padded["input_values"].shape == (1, 30) and padded["attention_mask"].sum() == 10


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.zeros((2, 3, 4)), "one mono clip"),
        ([np.zeros((5, 2))], "mono audio of shape"),
        ([], "empty"),
        ([np.zeros(0)], "clip 0 is empty"),
        ("audio.wav", "NumPy array, a torch tensor or a list"),
    ],
)
def test_feature_extractor_rejects_bad_audio(raw, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerceiverFeatureExtractor(sampling_rate=8000)(raw, sampling_rate=8000)


def test_feature_extractor_accepts_tensors_and_single_clips() -> None:
    extractor = PerceiverFeatureExtractor(sampling_rate=8000)
    from_tensor = extractor(torch.arange(12.0), sampling_rate=8000, return_tensors="pt")
    from_list = extractor([float(v) for v in range(12)], sampling_rate=8000, return_tensors="pt")
    assert from_tensor["input_values"].shape == (1, 12)
    torch.testing.assert_close(from_tensor["input_values"], from_list["input_values"])


def test_feature_extractor_round_trip_and_auto_class(tmp_path: Path) -> None:
    config = tiny_audio_config()
    extractor = PerceiverFeatureExtractor.from_perceiver_config(config, do_normalize=False)
    assert (extractor.sampling_rate, extractor.max_length) == (8000, 64)
    extractor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(loaded) is PerceiverFeatureExtractor
    assert loaded.to_dict() == extractor.to_dict()


def test_feature_extractor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"feature_size \(2\)"):
        PerceiverFeatureExtractor(feature_size=2)
    with pytest.raises(ValueError, match=r"sampling_rate \(0\)"):
        PerceiverFeatureExtractor(sampling_rate=0)


# ---------------------------------------------------------------------------------------------------
# Pipeline and remote code
# ---------------------------------------------------------------------------------------------------


def save_audio_classifier(directory: Path) -> tuple[PerceiverForAudioClassification, PerceiverFeatureExtractor]:
    names = ["zero", "one", "two"]
    config = tiny_audio_config(
        max_audio_samples=4000,
        audio_patch_size=40,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    torch.manual_seed(0)
    model = PerceiverForAudioClassification(config).eval()
    with torch.no_grad():  # distinct logits, so the ranking is a real check
        model.classification_decoder.output_adapter.linear.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    extractor = PerceiverFeatureExtractor.from_perceiver_config(config)
    model.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return model, extractor


def expected_scores(model, extractor, clip: np.ndarray) -> dict[str, float]:
    batch = extractor(clip, sampling_rate=8000, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**batch).logits.softmax(-1)[0]
    return {model.config.id2label[i]: p.item() for i, p in enumerate(probabilities)}


def test_audio_classification_pipeline_on_arrays(tmp_path: Path, fsdd_clips) -> None:
    model, extractor = save_audio_classifier(tmp_path)
    classifier = pipeline("audio-classification", model=str(tmp_path))
    assert type(classifier.model) is PerceiverForAudioClassification
    clip = fsdd_clips[0][0]
    expected = expected_scores(model, extractor, clip)
    for given in (clip, {"array": clip, "sampling_rate": 8000}, torch.from_numpy(clip)):
        predictions = classifier(given)
        assert [p["label"] for p in predictions] == sorted(expected, key=expected.get, reverse=True)
        for prediction in predictions:
            assert prediction["score"] == pytest.approx(expected[prediction["label"]], abs=1e-5)
    # Clips longer than max_audio_samples are cut by the feature extractor, not refused by the model.
    assert len(classifier(np.tile(clip, 4)[:6000])) == 3


@pytest.mark.skipif(
    shutil.which("ffmpeg") is None,
    reason="transformers' audio-classification pipeline decodes audio files with the ffmpeg program, "
    "which is not installed (apt-get install ffmpeg); arrays are tested above without it",
)
def test_audio_classification_pipeline_on_a_wav_file(tmp_path: Path, fsdd_clips) -> None:
    model, extractor = save_audio_classifier(tmp_path / "model")
    clip = fsdd_clips[0][0]
    wav = tmp_path / "digit.wav"
    sf.write(wav, clip, 8000, subtype="FLOAT")  # float samples: ffmpeg decodes exactly what was written
    predictions = pipeline("audio-classification", model=str(tmp_path / "model"))(str(wav))
    expected = expected_scores(model, extractor, clip)
    for prediction in predictions:
        assert prediction["score"] == pytest.approx(expected[prediction["label"]], abs=1e-4)


REMOTE_AUDIO_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.path[:] = json.loads(sys.argv[1])
    assert importlib.util.find_spec("perceiver_hf") is None, "perceiver_hf is importable in the child"
    import torch
    from transformers import AutoModelForAudioClassification
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    audio = AutoModelForAudioClassification.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    config = json.load(open(sys.argv[3] + "/config.json"))
    cls = get_class_from_dynamic_module(config["auto_map"]["AutoModelForMultimodalClassification"], sys.argv[3])
    multimodal = cls.from_pretrained(sys.argv[3]).eval()
    assert "perceiver_hf" not in sys.modules
    batch = torch.load(sys.argv[4])
    with torch.no_grad():
        out = {
            "audio": audio(**batch["audio"]).logits,
            "multimodal": multimodal(**batch["multimodal"]).logits,
            "classes": [type(audio).__name__, type(multimodal).__name__],
        }
    torch.save(out, sys.argv[5])
    """
)


def test_remote_code_loads_audio_and_multimodal_classifiers_without_the_package(tmp_path: Path) -> None:
    from perceiver_tester import multimodal_batch, sys_path_without_the_package, tiny_multimodal_config

    from perceiver_hf import PerceiverForMultimodalClassification

    torch.manual_seed(0)
    audio_model = PerceiverForAudioClassification(tiny_audio_config()).eval()
    multimodal_model = PerceiverForMultimodalClassification(tiny_multimodal_config()).eval()
    audio_model.save_pretrained(tmp_path / "audio")
    multimodal_model.save_pretrained(tmp_path / "multimodal")
    saved = json.loads((tmp_path / "multimodal" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForMultimodalClassification"] == (
        "modeling_multimodal.PerceiverForMultimodalClassification"
    )
    for name in ("modeling_multimodal.py", "adapters_multimodal.py", "adapters_audio.py", "modeling_perceiver.py"):
        assert (tmp_path / "multimodal" / name).is_file(), name

    batch = {
        "audio": audio_batch(audio_model.config, [9, 5]),
        "multimodal": multimodal_batch(multimodal_model.config, [9, 5]),
    }
    torch.save(batch, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_audio = audio_model(**batch["audio"]).logits
        expected_multimodal = multimodal_model(**batch["multimodal"]).logits

    package_free_path = sys_path_without_the_package()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", REMOTE_AUDIO_CHILD, json.dumps(package_free_path),
         str(tmp_path / "audio"), str(tmp_path / "multimodal"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt")
    assert outputs["classes"] == ["PerceiverForAudioClassification", "PerceiverForMultimodalClassification"]
    assert torch.equal(outputs["audio"], expected_audio)
    assert torch.equal(outputs["multimodal"], expected_multimodal)


def test_audio_classifier_loads_through_its_auto_class(tmp_path: Path) -> None:
    model, _ = save_audio_classifier(tmp_path)
    loaded = AutoModelForAudioClassification.from_pretrained(tmp_path)
    assert type(loaded) is PerceiverForAudioClassification
    assert loaded.config.id2label == model.config.id2label


# ---------------------------------------------------------------------------------------------------
# Example script
# ---------------------------------------------------------------------------------------------------

AUDIO_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_audio_classification.py"
TINY_AUDIO_MODEL = [
    "--num_latents", "4", "--d_latents", "16", "--num_self_attention_layers_per_block", "1",
    "--num_cross_attention_heads", "2", "--num_self_attention_heads", "2", "--num_frequency_bands", "4",
    "--max_train_samples", "24", "--max_eval_samples", "8", "--batch_size", "8", "--logging_steps", "1",
    "--predict_samples", "2",
]  # fmt: skip


def run_audio_script(*args: str) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join([str(AUDIO_SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(AUDIO_SCRIPT), *TINY_AUDIO_MODEL, *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_audio_script_trains_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """On the shipped FSDD sample, with augmentation: the saved folder works with the pipeline, and a run resumed
    from its step-2 checkpoint ends with the same weights (augmentation is seeded per batch)."""
    from safetensors.torch import load_file

    common = ["--augment", "--max_steps", "4", "--checkpointing_steps", "2"]
    result = run_audio_script(*common, "--output_dir", str(tmp_path / "run"))
    assert "Predictions of pipeline('audio-classification'" in result.stdout
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["input_adapter"] == "audio" and config["input_adapter_config"]["sampling_rate"] == 8000
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    run_audio_script(*common, "--output_dir", str(tmp_path / "resumed"),
                     "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoints" / "step_2"))  # fmt: skip
    expected = load_file(tmp_path / "run" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)
    classifier = pipeline("audio-classification", model=str(tmp_path / "run"))
    assert len(classifier(np.zeros(4000, dtype=np.float32), top_k=3)) == 3
