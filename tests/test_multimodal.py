"""Several modalities in one forward pass: `ModalitySpec` validation, `MultimodalInputAdapter` (own Fourier
features, common width, modality embedding, joint mask, missing modalities, text split across layers),
`PerceiverForMultimodalClassification` (pooling choices, several tasks, `Trainer`) and `PerceiverProcessor`.

The generic head checks (shapes, loss, eager == SDPA, batch independence, save/load through
`AutoModelForMultimodalClassification`, checkpointing) run on the multimodal head through `HEAD_SPECS`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import DATA_DIR
from perceiver_tester import multimodal_batch, tiny_multimodal_config
from transformers import AutoConfig, AutoProcessor, Trainer, TrainingArguments

from perceiver_hf import (
    AutoModelForMultimodalClassification,
    ModalitySpec,
    MultimodalInputAdapter,
    PerceiverConfig,
    PerceiverFeatureExtractor,
    PerceiverForMultimodalClassification,
    PerceiverImageProcessor,
    PerceiverProcessor,
    fourier_features,
)

ATOL = 1e-5
IMAGE = {"name": "image", "channels": 1, "num_axes": 2, "num_freq_bands": 2, "max_freq": 5.0}
AUDIO = {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": 3, "max_freq": 12.0, "max_length": 48,
         "patch_size": 4}  # fmt: skip
TEXT = {"name": "text", "channels": 8, "num_axes": 1, "num_freq_bands": 2, "max_freq": 16.0, "vocab_size": 30}


def build(seed: int = 0, **overrides: Any) -> PerceiverForMultimodalClassification:
    torch.manual_seed(seed)
    return PerceiverForMultimodalClassification(tiny_multimodal_config(**overrides)).eval()


# ---------------------------------------------------------------------------------------------------
# Modality declarations
# ---------------------------------------------------------------------------------------------------

INVALID_MODALITIES: list[tuple[list[dict[str, Any]], list[str]]] = [
    ([{k: v for k, v in IMAGE.items() if k != "max_freq"}], ["'image'", "lacks", "max_freq"]),
    ([IMAGE | {"colour": True}], ["'image'", "unknown keys", "colour"]),
    ([IMAGE | {"name": "my image"}], ["modality name", "'my image'", "identifier"]),
    ([IMAGE | {"name": "labels"}], ["modality name", "'labels'"]),
    ([IMAGE | {"name": "image_mask"}], ["'image_mask'", "_mask"]),
    ([IMAGE | {"channels": 0}], ["'image'", "channels", "0"]),
    ([IMAGE | {"num_freq_bands": -1}], ["'image'", "num_freq_bands", "-1"]),
    ([IMAGE | {"max_freq": 0}], ["'image'", "max_freq", "0"]),
    ([IMAGE | {"patch_size": 2}], ["'image'", "patch_size", "1-axis"]),
    ([AUDIO | {"split_across_layers": True}], ["'audio'", "split_across_layers", "vocab_size"]),
    ([TEXT | {"num_axes": 2}], ["'text'", "token inputs", "num_axes=2"]),
    ([AUDIO | {"spectrogram": True, "patch_size": 1}], ["'audio'", "spectrogram needs", "patch_size=1"]),
    ([IMAGE, IMAGE], ["unique", "image"]),
    ([], ["modalities", "non-empty"]),
]


@pytest.mark.parametrize(("modalities", "expected"), INVALID_MODALITIES)
def test_config_rejects_bad_modalities(modalities: list[dict[str, Any]], expected: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        PerceiverConfig(input_adapter="multimodal", modalities=modalities)
    for part in expected:
        assert part in str(error.value), f"{part!r} not in {error.value}"


def test_config_rejects_text_split_unevenly_across_layers() -> None:
    with pytest.raises(ValueError, match=r"channels \(8\) divisible by the number of cross-attention layers \(3\)"):
        tiny_multimodal_config(
            modalities=[TEXT | {"split_across_layers": True}], num_cross_attention_layers=3, num_self_attention_blocks=3
        )


def test_config_rejects_bad_pooling_and_tasks() -> None:
    with pytest.raises(ValueError, match=r"pooling \('max'\)"):
        tiny_multimodal_config(pooling="max")
    with pytest.raises(ValueError, match=r"task_num_labels \(\[3, 0\]\)"):
        tiny_multimodal_config(task_num_labels=[3, 0])
    with pytest.raises(ValueError, match=r"7 tasks .* num_latents \(6\)"):
        tiny_multimodal_config(pooling="latents", task_num_labels=[2] * 7)


def test_config_json_stays_plain_and_round_trips(tmp_path: Path) -> None:
    config = tiny_multimodal_config(modalities=[IMAGE, TEXT | {"split_across_layers": True}], task_num_labels=[3, 2])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["input_adapter_config"]["modalities"] == [IMAGE, TEXT | {"split_across_layers": True}]
    assert saved["input_adapter"] == "multimodal" and saved["task_num_labels"] == [3, 2]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.modalities == config.modalities and loaded.pooling == "decoder"
    assert ModalitySpec.from_dict(AUDIO).to_dict() == AUDIO | {
        "vocab_size": None,
        "split_across_layers": False,
        "spectrogram": False,
    }


# ---------------------------------------------------------------------------------------------------
# Input adapter
# ---------------------------------------------------------------------------------------------------


def test_adapter_pads_each_modality_to_the_common_width_with_its_own_fourier_features() -> None:
    torch.manual_seed(0)
    adapter = MultimodalInputAdapter([IMAGE, AUDIO])
    image_width, audio_width = 1 + 2 * (2 * 2 + 1), 4 + 1 * (2 * 3 + 1)
    assert adapter.num_input_channels == max(image_width, audio_width) == 11
    image = torch.randn(2, 5, 4, 1)
    audio = torch.randn(2, 20)
    x, mask = adapter({"image": image, "audio": audio})
    assert mask is None and x.shape == (2, 20 + 5, 11)
    image_part = x[:, :20] - adapter.modality_embedding["image"].weight
    audio_part = x[:, 20:] - adapter.modality_embedding["audio"].weight
    torch.testing.assert_close(image_part[..., :1], image.reshape(2, 20, 1))
    torch.testing.assert_close(image_part[0, :, 1:image_width], fourier_features((5, 4), 2, (5.0, 5.0)))
    assert (image_part[..., image_width:] == 0).all()  # zero padding to the common width
    torch.testing.assert_close(audio_part[..., :4], audio.view(2, 5, 4))  # 4-sample patches
    # Audio positions lie on the fixed grid of max_length / patch_size = 12 positions.
    torch.testing.assert_close(audio_part[0, :, 4:], fourier_features((12,), 3, (12.0,))[:5])


def test_spectrogram_modality_feeds_log_power_spectra() -> None:
    adapter = MultimodalInputAdapter([AUDIO | {"spectrogram": True, "patch_size": 8, "max_length": None}])
    assert adapter.num_input_channels == 5 + 7
    audio = torch.randn(2, 16)
    x, _ = adapter({"audio": audio})
    spectra = torch.log1p(torch.fft.rfft(audio.view(2, 2, 8), dim=-1).abs() ** 2)
    torch.testing.assert_close(x[..., :5] - adapter.modality_embedding["audio"].weight[:, :5], spectra)


def test_adapter_accepts_channels_first_and_channels_last() -> None:
    adapter = MultimodalInputAdapter([IMAGE | {"channels": 3}])
    image = torch.randn(2, 5, 4, 3)
    last, _ = adapter({"image": image})
    first, _ = adapter({"image": image.permute(0, 3, 1, 2)})
    torch.testing.assert_close(first, last)


def test_modality_embedding_does_not_depend_on_the_other_modalities() -> None:
    """The features of "audio" are the same with and without "image" in the batch (keyed by name, not index)."""
    adapter = MultimodalInputAdapter([IMAGE, AUDIO])
    audio = torch.randn(2, 20)
    both, _ = adapter({"image": torch.randn(2, 5, 4, 1), "audio": audio})
    alone, _ = adapter({"audio": audio})
    torch.testing.assert_close(both[:, 20:], alone)


def test_adapter_joint_mask_from_per_modality_masks() -> None:
    adapter = MultimodalInputAdapter([IMAGE, AUDIO])
    audio_mask = torch.zeros(2, 20, dtype=torch.long)
    audio_mask[0, :9] = 1  # 9 samples: patches 0-2 real
    audio_mask[1] = 1
    present = torch.tensor([1, 0])  # the second example has no image
    _, mask = adapter(
        {"image": torch.randn(2, 1, 5, 4), "audio": torch.randn(2, 20)}, {"image": present, "audio": audio_mask}
    )
    assert mask.dtype == torch.bool and mask.shape == (2, 25)
    assert mask[0].tolist() == [True] * 20 + [True] * 3 + [False] * 2
    assert mask[1].tolist() == [False] * 20 + [True] * 5


@pytest.mark.parametrize(
    ("inputs", "masks", "message"),
    [
        ({"video": torch.randn(2, 3)}, None, r"unknown modalities \['video'\]"),
        ({}, None, "none of the modalities"),
        ({"image": torch.randn(2, 5, 4), "audio": torch.randn(3, 8)}, None, "same batch size"),
        ({"image": torch.randn(2, 5, 4, 2)}, None, "no axis of 1 channels"),
        ({"image": torch.randn(2, 5)}, None, r"2 axes and 1 channels"),
        ({"audio": torch.randint(0, 3, (2, 8))}, None, "floating point"),
        ({"audio": torch.randn(2, 60)}, None, r"length 60, more than its max_length \(48\)"),
        ({"audio": torch.randn(2, 8)}, {"audio": torch.ones(2, 7)}, r"mask of modality 'audio' must have shape"),
        ({"audio": torch.randn(2, 8)}, {"image": torch.ones(2)}, "not in the inputs"),
    ],
)
def test_adapter_rejects_bad_inputs(inputs: dict, masks: dict | None, message: str) -> None:
    adapter = MultimodalInputAdapter([IMAGE, AUDIO])
    with pytest.raises(ValueError, match=message):
        adapter(inputs, masks)


def test_text_split_across_layers_gives_each_layer_its_slice_of_the_embedding() -> None:
    adapter = MultimodalInputAdapter([IMAGE, TEXT | {"split_across_layers": True}], num_layers=2)
    ids = torch.randint(0, 30, (2, 7))
    layers, mask = adapter({"image": torch.randn(2, 5, 4), "text": ids[..., None]}, {"text": torch.ones(2, 7)})
    assert isinstance(layers, list) and len(layers) == 2 and mask.shape == (2, 27)
    embedded = adapter.token_embeddings["text"](ids)  # (2, 7, 8)
    text_embedding = adapter.modality_embedding["text"].weight
    for layer, x in enumerate(layers):
        torch.testing.assert_close(x[:, 20:, :4] - text_embedding[:, :4], embedded[..., 4 * layer : 4 * layer + 4])
        torch.testing.assert_close(x[:, :20], layers[0][:, :20])  # the image is the same for every layer
    with pytest.raises(ValueError, match="integer token ids"):
        adapter({"text": torch.randn(2, 7)})


def test_split_text_reaches_each_cross_attention_layer() -> None:
    """The encoder gives cross-attention layer i the i-th array (the inputs its keys and values come from)."""
    model = build(
        modalities=[IMAGE, TEXT | {"split_across_layers": True}],
        num_cross_attention_layers=2,
        num_self_attention_blocks=2,
    )
    seen = []
    encoder = model.perceiver.encoder
    for layer in encoder.cross_attention.values():
        original = layer.project_kv

        def recording(x_kv, _original=original):
            seen.append(x_kv)
            return _original(x_kv)

        layer.project_kv = recording
    inputs = {"image": torch.randn(2, 5, 4), "text": torch.randint(0, 30, (2, 7))}
    with torch.no_grad():
        model(inputs=inputs)
    expected, _ = encoder.input_adapter(inputs)
    assert len(seen) == 2
    for actual, layer_input in zip(seen, expected, strict=True):
        torch.testing.assert_close(actual, layer_input)
    assert not torch.equal(seen[0], seen[1])


def test_unsplit_text_is_an_ordinary_modality() -> None:
    model = build(modalities=[AUDIO, TEXT], num_labels=2)
    out = model(text=torch.randint(0, 30, (3, 6)), text_mask=torch.ones(3, 6), audio=torch.randn(3, 10))
    assert out.logits.shape == (3, 2)


# ---------------------------------------------------------------------------------------------------
# Model: missing modalities, masks, keyword inputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_an_example_without_a_modality_equals_a_batch_without_it(attn_implementation: str) -> None:
    """Masking a modality out for one example ((B,) mask) gives that example the logits it gets when the
    modality is not in the inputs at all; the other examples keep their image."""
    model = build(attn_implementation=attn_implementation)
    batch = multimodal_batch(model.config, [9, 6], seed=4)
    with torch.no_grad():
        mixed = model(**batch, image_mask=torch.tensor([1, 0])).logits
        audio_only = model(audio=batch["audio"], audio_mask=batch["audio_mask"]).logits
        both = model(**batch).logits
    torch.testing.assert_close(mixed[1], audio_only[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[0], both[0], atol=ATOL, rtol=0)
    assert not torch.allclose(both[1], audio_only[1], atol=1e-3)  # the image does matter when present


def test_padding_of_one_modality_leaves_the_logits_unchanged() -> None:
    model = build()
    batch = multimodal_batch(model.config, [5, 3], seed=5)
    padded = dict(batch)
    padded["audio"] = torch.nn.functional.pad(batch["audio"], (0, 16))
    padded["audio"][:, 20:] = torch.randn(2, 16)  # noise in the padding
    padded["audio_mask"] = torch.nn.functional.pad(batch["audio_mask"], (0, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**batch).logits, atol=ATOL, rtol=0)


def test_an_example_with_no_modality_at_all_is_refused() -> None:
    model = build()
    batch = multimodal_batch(model.config, [5, 3])
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] mask out every input position"):
        model(image=batch["image"], image_mask=torch.tensor([1, 0]))


def test_keywords_and_dicts_are_the_same_inputs() -> None:
    model = build()
    batch = multimodal_batch(model.config, [7, 4])
    with torch.no_grad():
        from_keywords = model(**batch).logits
        from_dicts = model(
            inputs={"image": batch["image"], "audio": batch["audio"]}, attention_mask={"audio": batch["audio_mask"]}
        ).logits
        audio_tensor_mask = model(audio=batch["audio"], attention_mask=batch["audio_mask"]).logits
        audio_dict_mask = model(audio=batch["audio"], audio_mask=batch["audio_mask"]).logits
    torch.testing.assert_close(from_keywords, from_dicts)
    torch.testing.assert_close(audio_tensor_mask, audio_dict_mask)
    with pytest.raises(ValueError, match="unexpected argument 'video'"):
        model(video=batch["image"])
    with pytest.raises(ValueError, match="given twice"):
        model(inputs={"image": batch["image"]}, image=batch["image"])
    with pytest.raises(ValueError, match="attention_mask must be a dict"):
        model(image=batch["image"], audio=batch["audio"], attention_mask=batch["audio_mask"])
    with pytest.raises(ValueError, match="no input given"):
        model()


def test_multimodal_head_needs_a_multimodal_config() -> None:
    with pytest.raises(ValueError, match="input_adapter='multimodal'"):
        PerceiverForMultimodalClassification(PerceiverConfig(input_adapter="text", d_latents=16, num_latents=4))


# ---------------------------------------------------------------------------------------------------
# Pooling and task heads
# ---------------------------------------------------------------------------------------------------


def test_mean_pooling_feeds_the_mean_latent_to_the_head() -> None:
    model = build(pooling="mean")
    batch = multimodal_batch(model.config, [6, 4])
    with torch.no_grad():
        out = model(**batch)
        expected = model.task_heads[0](out.latents.mean(dim=1))
    torch.testing.assert_close(out.logits, expected)
    assert model.pooler is None


def test_latent_pooling_gives_each_task_its_own_latent() -> None:
    model = build(pooling="latents", task_num_labels=[3, 2, 4])
    batch = multimodal_batch(model.config, [6, 4])
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, 9) and [t.shape[-1] for t in out.task_logits] == [3, 2, 4]
    for task, head in enumerate(model.task_heads):
        torch.testing.assert_close(out.task_logits[task], head(out.latents[:, task]))
    torch.testing.assert_close(out.logits, torch.cat(out.task_logits, dim=-1))


def test_decoder_pooling_decodes_one_query_per_task() -> None:
    model = build(pooling="decoder", task_num_labels=[3, 2], d_output_queries=8)
    batch = multimodal_batch(model.config, [6, 4])
    with torch.no_grad():
        out = model(**batch)
    assert model.pooler.output_query.shape == (2, 8)
    assert out.pooled.shape == (2, 2, 8) and out.logits.shape == (2, 5)


def test_no_pooling_returns_the_latents() -> None:
    model = build(pooling="none")
    batch = multimodal_batch(model.config, [6, 4])
    out = model(**batch)
    assert out.logits is None and out.task_logits is None
    assert out.latents.shape == (2, 6, 16) and torch.equal(out.pooled, out.latents)
    assert len(model.task_heads) == 0
    with pytest.raises(ValueError, match="pooling='none' has no task heads"):
        model(**batch, labels=torch.tensor([0, 1]))


class MaxPooledClassifier(PerceiverForMultimodalClassification):
    """The documented extension point: override `pool`."""

    def pool(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.max(dim=1).values


def test_pool_can_be_overridden() -> None:
    torch.manual_seed(0)
    model = MaxPooledClassifier(tiny_multimodal_config(pooling="mean")).eval()
    batch = multimodal_batch(model.config, [6, 4])
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.logits, model.task_heads[0](out.latents.max(dim=1).values))


def test_several_tasks_loss_ignores_missing_labels() -> None:
    model = build(pooling="latents", task_num_labels=[3, 2])
    batch = multimodal_batch(model.config, [6, 4, 5])
    labels = torch.tensor([[0, 1], [2, -100], [-100, 0]])
    out = model(**batch, labels=labels)
    # The mean over the four labelled (example, task) pairs.
    summed = torch.nn.functional.cross_entropy(out.task_logits[0][:2], torch.tensor([0, 2]), reduction="sum")
    summed = summed + torch.nn.functional.cross_entropy(
        out.task_logits[1][[0, 2]], torch.tensor([1, 0]), reduction="sum"
    )
    torch.testing.assert_close(out.loss, summed / 4)
    with pytest.raises(ValueError, match=r"labels of 2 tasks must have shape \(batch, tasks\) = \(3, 2\)"):
        model(**batch, labels=torch.tensor([0, 1, 2]))


def test_geglu_feed_forward_by_option() -> None:
    gelu, geglu = build(hidden_act="gelu"), build(hidden_act="geglu")
    gelu_mlp, geglu_mlp = (m.perceiver.encoder.cross_attention["0"].mlp for m in (gelu, geglu))
    assert geglu_mlp.fc1.out_features == 2 * gelu_mlp.fc1.out_features
    batch = multimodal_batch(geglu.config, [6, 4])
    assert torch.isfinite(geglu(**batch, labels=torch.tensor([0, 1])).loss)


# ---------------------------------------------------------------------------------------------------
# Real data: processor and Trainer
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs() -> list[dict[str, Any]]:
    """The shipped MNIST + FSDD pair sample: 50 (image, spoken digit) pairs of the same digit."""
    rows = pq.read_table(DATA_DIR / "mnist_fsdd_pairs.parquet", columns=["image", "audio", "label"]).to_pylist()
    decoded = []
    for row in rows:
        clip, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        assert rate == 8000
        image = PIL.Image.open(io.BytesIO(row["image"]["bytes"]))
        decoded.append({"image": image, "audio": clip, "label": row["label"]})
    return decoded


def pair_config(**overrides: Any) -> PerceiverConfig:
    modalities = [
        {"name": "image", "channels": 1, "num_axes": 2, "num_freq_bands": 4, "max_freq": 28.0},
        {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": 4, "max_freq": 64.0,
         "max_length": 8000, "patch_size": 128},
    ]  # fmt: skip
    # initializer_range 0.1: with 0.02 the attention of so narrow a model starts uniform and training plateaus.
    return tiny_multimodal_config(
        modalities=modalities, num_labels=10, d_latents=32, num_latents=8, initializer_range=0.1, **overrides
    )


def pair_processor(config: PerceiverConfig, **kwargs: Any) -> PerceiverProcessor:
    image_processor = PerceiverImageProcessor(
        size={"height": 28, "width": 28}, do_convert_rgb=False, do_convert_grayscale=True, image_mean=[0.5],
        image_std=[0.5],
    )  # fmt: skip
    feature_extractor = PerceiverFeatureExtractor(sampling_rate=8000, max_length=8000)
    return PerceiverProcessor.from_perceiver_config(
        config, image_processor=image_processor, feature_extractor=feature_extractor, **kwargs
    )


def test_processor_outputs_feed_the_model(pairs) -> None:
    config = pair_config()
    processor = pair_processor(config)
    assert processor.modality_names == {"image": "image", "audio": "audio"}
    batch = processor(
        images=[p["image"] for p in pairs[:3]], audio=[p["audio"] for p in pairs[:3]], sampling_rate=8000,
        return_tensors="pt",
    )  # fmt: skip
    assert sorted(batch) == ["audio", "audio_mask", "image"]
    assert batch["image"].shape == (3, 1, 28, 28)
    assert batch["audio_mask"].sum(1).tolist() == [min(len(p["audio"]), 8000) for p in pairs[:3]]
    torch.manual_seed(0)
    model = PerceiverForMultimodalClassification(config).eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == (3, 10)
        audio_only = processor(audio=[p["audio"] for p in pairs[:3]], sampling_rate=8000, return_tensors="pt")
        assert sorted(audio_only) == ["audio", "audio_mask"]
        assert model(**audio_only).logits.shape == (3, 10)


def test_processor_without_modality_names_keeps_the_usual_names(pairs, wordpiece_tokenizer) -> None:
    config = pair_config()
    processor = PerceiverProcessor(
        image_processor=pair_processor(config).image_processor,
        feature_extractor=PerceiverFeatureExtractor(sampling_rate=8000),
        tokenizer=wordpiece_tokenizer,
    )
    images = processor(images=[pairs[0]["image"]], return_tensors="pt")
    assert sorted(images) == ["pixel_values"]
    audio = processor(audio=[pairs[0]["audio"]], sampling_rate=8000, return_tensors="pt")
    assert sorted(audio) == ["attention_mask", "input_values"]
    text = processor(text=["a spoken digit"], return_tensors="pt")
    assert {"input_ids", "attention_mask"} <= set(text)
    with pytest.raises(ValueError, match="set modality_names"):
        processor(audio=[pairs[0]["audio"]], text=["seven"], sampling_rate=8000)
    with pytest.raises(ValueError, match="at least one of images, text and audio"):
        processor()


def test_processor_with_text_names_the_text_modality(wordpiece_tokenizer) -> None:
    processor = PerceiverProcessor(tokenizer=wordpiece_tokenizer, modality_names={"text": "caption"})
    batch = processor(text=["a short one", "a somewhat longer caption here"], return_tensors="pt")
    assert sorted(batch) == ["caption", "caption_mask"]
    assert batch["caption"].shape == batch["caption_mask"].shape


def test_processor_refuses_inputs_it_has_no_sub_processor_for(pairs) -> None:
    processor = PerceiverProcessor(feature_extractor=PerceiverFeatureExtractor(sampling_rate=8000))
    with pytest.raises(ValueError, match="images was given, but this PerceiverProcessor has no image_processor"):
        processor(images=[pairs[0]["image"]])
    with pytest.raises(ValueError, match="at least one of image_processor"):
        PerceiverProcessor()
    with pytest.raises(ValueError, match="modality_names keys"):
        PerceiverProcessor(feature_extractor=PerceiverFeatureExtractor(), modality_names={"smell": "nose"})


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["image+audio", "image+audio+text"])
def test_processor_round_trip(tmp_path: Path, pairs, wordpiece_tokenizer, with_tokenizer: bool) -> None:
    config = pair_config()
    processor = pair_processor(config, tokenizer=wordpiece_tokenizer if with_tokenizer else None)
    processor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    for loader in (PerceiverProcessor, AutoProcessor):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is PerceiverProcessor
        assert loaded.modality_names == processor.modality_names
        assert (loaded.tokenizer is None) == (not with_tokenizer)
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert loaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
        inputs = {"images": [pairs[1]["image"]], "audio": [pairs[1]["audio"]], "sampling_rate": 8000}
        expected, actual = processor(**inputs, return_tensors="pt"), loaded(**inputs, return_tensors="pt")
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key])
    if with_tokenizer:
        assert loaded.tokenizer("seven")["input_ids"] == wordpiece_tokenizer("seven")["input_ids"]


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[dict[str, Any]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pairs[index]


def test_trainer_trains_the_multimodal_classifier(tmp_path: Path, pairs) -> None:
    """`transformers.Trainer` trains the head with no glue beyond a collator: the loss comes from `labels`, the
    model is saved and reloads through `AutoModelForMultimodalClassification`."""
    config = pair_config()
    processor = pair_processor(config)

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = processor(
            images=[e["image"] for e in examples], audio=[e["audio"] for e in examples], sampling_rate=8000,
            return_tensors="pt",
        )  # fmt: skip
        return {**batch, "labels": torch.tensor([e["label"] for e in examples])}

    torch.manual_seed(0)
    model = PerceiverForMultimodalClassification(config)
    data = PairDataset([p for p in pairs if p["label"] in (0, 1)])  # 10 pairs: 5 zeros, 5 ones
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=10, num_train_epochs=30, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses
    trainer.save_model(str(tmp_path / "model"))
    reloaded = AutoModelForMultimodalClassification.from_pretrained(tmp_path / "model").eval()
    batch = collate(pairs[:4])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_multimodal_script_reports_every_condition(tmp_path: Path) -> None:
    """The example script on the shipped pairs: trains with modality dropout, evaluates with both modalities
    and each one missing, and saves a model and processor that load through the Auto classes."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "run_multimodal_classification.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    args = [
        "--max_steps", "3", "--batch_size", "8", "--modality_dropout", "0.3", "--num_latents", "4",
        "--d_latents", "16", "--num_heads", "2", "--num_self_attention_layers_per_block", "1",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert set(results) == {"image+audio", "image_only", "audio_only"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    model = AutoModelForMultimodalClassification.from_pretrained(tmp_path / "run")
    processor = AutoProcessor.from_pretrained(tmp_path / "run")
    assert model.modality_names == ["image", "audio"]
    assert processor.modality_names == {"image": "image", "audio": "audio"}
