"""Tests of `PerceiverConfig`: validation with clear errors, and a readable, lossless `config.json`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from perceiver_tester import tiny_image_config, tiny_text_config
from transformers import AutoConfig

from perceiver_hf import PerceiverConfig
from perceiver_hf.configuration_perceiver import INPUT_ADAPTERS, input_adapter_settings


def test_defaults_and_tiny_configs_are_valid() -> None:
    assert PerceiverConfig().model_type == "perceiver_io"
    assert tiny_text_config().input_adapter == "text"
    assert tiny_image_config().input_adapter == "image"


# (config overrides, substrings the error message must contain: the argument name(s) and the value)
INVALID_CONFIGS: list[tuple[dict[str, Any], list[str]]] = [
    # heads not dividing the channels
    (
        {"d_latents": 30, "num_self_attention_heads": 4, "self_attention_qk_channels": None},
        ["d_latents", "30", "num_self_attention_heads", "4"],
    ),
    (
        {"num_cross_attention_heads": 3, "cross_attention_qk_channels": None},
        ["d_latents", "16", "num_cross_attention_heads", "3"],
    ),
    (
        {"self_attention_qk_channels": 10, "num_self_attention_heads": 4},
        ["self_attention_qk_channels", "10", "num_self_attention_heads", "4"],
    ),
    (
        {"cross_attention_v_channels": 9, "num_cross_attention_heads": 2},
        ["cross_attention_v_channels", "9", "num_cross_attention_heads", "2"],
    ),
    ({"decoder_qk_channels": 10, "num_decoder_heads": 4}, ["decoder_qk_channels", "10", "num_decoder_heads", "4"]),
    # unknown names
    ({"input_adapter": "smell"}, ["input_adapter", "smell"]),
    ({"hidden_act": "relu6"}, ["hidden_act", "relu6"]),
    ({"image_position_encoding": "sinusoidal"}, ["image_position_encoding", "sinusoidal"]),
    ({"image_preprocessing": "resize"}, ["image_preprocessing", "resize"]),
    # negative, zero and non-integer sizes
    ({"num_latents": -1}, ["num_latents", "-1"]),
    ({"d_latents": 0}, ["d_latents", "0"]),
    ({"vocab_size": -5}, ["vocab_size", "-5"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings", "0"]),
    ({"d_model": -16}, ["d_model", "-16"]),
    ({"num_self_attention_layers_per_block": 0}, ["num_self_attention_layers_per_block", "0"]),
    ({"num_self_attention_heads": -2}, ["num_self_attention_heads", "-2"]),
    ({"num_output_queries": 0}, ["num_output_queries", "0"]),
    ({"self_attention_qk_channels": -8}, ["self_attention_qk_channels", "-8"]),
    ({"num_latents": 2.5}, ["num_latents", "2.5"]),
    ({"num_latents": True}, ["num_latents", "True"]),
    ({"image_size": [0, 5]}, ["image_size", "0"]),
    ({"image_size": [4, 4, 4]}, ["image_size", "4, 4, 4"]),
    ({"max_frequency": -1.0}, ["max_frequency", "-1.0"]),
    ({"initializer_range": 0.0}, ["initializer_range", "0.0"]),
    # dropout out of range
    ({"dropout": 1.5}, ["dropout", "1.5"]),
    ({"dropout": -0.1}, ["dropout", "-0.1"]),
    ({"attention_dropout": 1.0}, ["attention_dropout", "1.0"]),
    # more cross-attention layers than blocks to follow them
    (
        {"num_cross_attention_layers": 3, "num_self_attention_blocks": 2},
        ["num_cross_attention_layers", "3", "num_self_attention_blocks", "2"],
    ),
    # pad token outside the vocabulary
    ({"pad_token_id": 41, "vocab_size": 41}, ["pad_token_id", "41", "vocab_size"]),
    ({"pad_token_id": -1}, ["pad_token_id", "-1"]),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    INVALID_CONFIGS,
    ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in INVALID_CONFIGS],
)
def test_invalid_value_raises_value_error_naming_it(overrides: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        tiny_text_config(**overrides)
    message = str(excinfo.value)
    for part in expected:
        assert part in message, f"{part!r} missing from the error message {message!r}"


def test_invalid_config_json_is_rejected_on_load(tmp_path: Path) -> None:
    """Validation also guards configs read from disk (a hand-edited config.json)."""
    tiny_text_config().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    data = json.loads(config_file.read_text())
    data["num_self_attention_heads"] = 5  # 16 channels cannot be split over 5 heads
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_self_attention_heads"):
        PerceiverConfig.from_pretrained(tmp_path)


ROUND_TRIP_CONFIGS = {
    "text": lambda: tiny_text_config(
        num_cross_attention_layers=2,
        num_self_attention_blocks=3,
        first_self_attention_block_shared=False,
        hidden_act="geglu",
        dropout=0.1,
        tie_word_embeddings=False,
        decode_masked_only=False,
        decoder_use_query_residual=True,
    ),
    "image": lambda: tiny_image_config(
        image_position_encoding="learned",
        max_frequency=12.5,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        freeze_encoder=True,
        problem_type="single_label_classification",
    ),
}


def _without_path(config: PerceiverConfig) -> dict[str, Any]:
    # `_name_or_path` records where a config was loaded from, not what it describes.
    return {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


@pytest.mark.parametrize("kind", sorted(ROUND_TRIP_CONFIGS))
def test_config_json_round_trip(kind: str, tmp_path: Path) -> None:
    config = ROUND_TRIP_CONFIGS[kind]()
    config.save_pretrained(tmp_path)
    reloaded = PerceiverConfig.from_pretrained(tmp_path)
    assert _without_path(reloaded) == _without_path(config)
    via_auto = AutoConfig.from_pretrained(tmp_path)
    assert type(via_auto) is PerceiverConfig
    assert _without_path(via_auto) == _without_path(config)


def test_config_json_is_plain_readable_json(tmp_path: Path) -> None:
    """config.json describes the whole model with plain JSON values: the adapter's own settings grouped under
    `input_adapter_config`, no other adapter's settings."""
    config = tiny_image_config(id2label={0: "a", 1: "b", 2: "c"})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "perceiver_io"
    assert data["input_adapter"] == "image"
    assert data["input_adapter_config"]["image_size"] == [6, 5]
    assert set(data["input_adapter_config"]) == set(input_adapter_settings("image"))
    assert data["num_latents"] == 6 and data["d_latents"] == 16
    # Only the image adapter's settings: none of the text, audio or multimodal adapters'.
    others = {name for kind in INPUT_ADAPTERS if kind != "image" for name in input_adapter_settings(kind)}
    others -= set(input_adapter_settings("image"))
    assert not others & set(data) and not others & set(data["input_adapter_config"])
    # No opaque blobs: the adapter settings and transformers' own label maps (and auto_map) are the nested objects.
    nested = {key for key, value in data.items() if isinstance(value, dict)}
    assert nested <= {"input_adapter_config", "id2label", "label2id", "auto_map"}, nested
    # Self-describing: every constructor argument is written out, defaults included.
    arguments = set(inspect.signature(PerceiverConfig.__init__).parameters) - {"self", "kwargs"}
    missing = arguments - set(data)
    assert not missing, f"config.json lacks {sorted(missing)}"


def test_adapter_settings_read_and_write_as_attributes() -> None:
    """`config.vocab_size` is the text adapter's setting (transformers' `resize_token_embeddings` writes it);
    a text config has no image settings at all."""
    config = tiny_text_config()
    assert config.vocab_size == config.input_adapter_config["vocab_size"] == 41
    config.vocab_size = 50
    assert config.input_adapter_config["vocab_size"] == 50
    assert not hasattr(config, "image_size")
    with pytest.raises(AttributeError, match="image_size"):
        _ = config.image_size
    # The flat keyword arguments of release 0.1.0 still work and land in the adapter's settings.
    assert PerceiverConfig(input_adapter="image", image_size=[8, 4]).input_adapter_config["image_size"] == [8, 4]
