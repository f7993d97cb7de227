"""Models saved by release 0.1.0 keep loading.

`tests/fixtures/release_0_1_0/` holds tiny models saved by that release (commit 2262f6f; the script is in
`tests/fixtures/release_0_1_0/README.md`), each with fixed inputs and the logits that release computed. Their
config.json is flat (every adapter's settings at the top level) and their weights use the encoder's old layer
names (`cross_attention_1`, `self_attention_n.0`, ...). Today's release migrates both on load, computes the same
logits, and saves under today's layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from perceiver_hf import (
    PerceiverConfig,
    PerceiverForAudioClassification,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForMultimodalClassification,
    PerceiverForSequenceClassification,
)

FIXTURES = Path(__file__).parent / "fixtures" / "release_0_1_0"
MODELS = {
    "masked_lm": PerceiverForMaskedLM,
    "text_classifier_original_perceiver": PerceiverForSequenceClassification,
    "image_classifier": PerceiverForImageClassification,
    "audio_classifier": PerceiverForAudioClassification,
    "multimodal_classifier": PerceiverForMultimodalClassification,
}


def reference(name: str) -> tuple[dict, torch.Tensor]:
    """The inputs (`input.<name>` or `input.<name>.<modality>`) and logits saved with the fixture."""
    saved = load_file(FIXTURES / name / "reference_io.safetensors")
    inputs: dict = {}
    for key, tensor in saved.items():
        if key.startswith("input."):
            _, *path = key.split(".")
            if len(path) == 2:
                inputs.setdefault(path[0], {})[path[1]] = tensor
            else:
                inputs[path[0]] = tensor
    return inputs, saved["logits"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_release_0_1_0_models_load_and_give_their_logits(name: str, tmp_path: Path) -> None:
    model = MODELS[name].from_pretrained(FIXTURES / name).eval()
    inputs, expected = reference(name)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=0)

    # Saved again, it is today's format: nested adapter settings, today's weight names; and it round-trips.
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "input_adapter_config" in config
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert not [n for n in names if re.search(r"(cross|self)_attention_[1n]\.", n)], names
    reloaded = MODELS[name].from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_release_0_1_0_config_migrates() -> None:
    """The flat text config carried image and audio settings; the migrated config holds the text adapter's only
    (settings added since, like the context convolution, at their defaults: off)."""
    flat = json.loads((FIXTURES / "masked_lm" / "config.json").read_text())
    assert "image_size" in flat and "max_audio_samples" in flat and "vocab_size" in flat
    config = AutoConfig.from_pretrained(FIXTURES / "masked_lm")
    assert isinstance(config, PerceiverConfig)
    assert config.input_adapter_config == {
        "vocab_size": flat["vocab_size"],
        "max_position_embeddings": flat["max_position_embeddings"],
        "d_model": flat["d_model"],
        "context_kernel_size": None,
    }
    assert config.mlm_decoder_queries == "positions"
    assert not hasattr(config, "image_size")
    # The encoder's weight sharing is unchanged by the migration.
    assert config.weight_sharing == ([0], [[0, 1], [2, 3]])


def test_release_0_1_0_model_loads_through_the_auto_class() -> None:
    model = AutoModel.from_pretrained(FIXTURES / "image_classifier")
    assert type(model).__name__ == "PerceiverModel"
    assert list(model.encoder.self_attention) == ["0_0", "0_1"]
