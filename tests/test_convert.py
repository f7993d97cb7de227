"""Conversion of transformers' Perceiver models: logit parity, fill-mask parity, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import PerceiverConfig as TransformersPerceiverConfig
from transformers import PerceiverForImageClassificationFourier, PerceiverTokenizer, pipeline
from transformers import PerceiverForMaskedLM as TransformersPerceiverForMaskedLM

import perceiver_hf
from perceiver_hf.convert import ConversionError, convert_transformers_perceiver

TOLERANCE = 1e-4  # max absolute logit difference, fp32


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every weight with a large std so that logits differ visibly between wrong mappings
    (the default init gives logits of ~1e-3, where a 1e-4 tolerance proves little)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
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
    assert model.perceiver.encoder.cross_attention_1.attention.attn_implementation == "sdpa"
    torch.testing.assert_close(model(input_ids=input_ids).logits, eager_logits, atol=1e-4, rtol=1e-4)

    model.train()
    model.gradient_checkpointing_enable()
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
