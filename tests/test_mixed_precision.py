"""Mixed precision: every head under bf16 (and fp16) autocast on the CPU, and in pure half precision.

What must hold in low precision: outputs finite and close to fp32 (within a tolerance stated relative to the
output's scale: bf16 keeps 8 bits of mantissa), losses computed in fp32, position features and masks unharmed,
gradients finite, `Trainer(bf16=True)` training every head. transformers' own Perceiver once crashed in fp16 in
its Fourier position encoding; here the features are computed in fp32 and cast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from perceiver_tester import HEAD_SPECS, HeadSpec, spec_ids

# bf16 rounds to ~3 significant digits; through a few attention layers the outputs drift by up to a few percent
# of their scale. The tolerance is relative to the largest fp32 output.
BF16_RELATIVE_TOLERANCE = 0.05
FP16_RELATIVE_TOLERANCE = 0.01


def outputs_and_loss(spec: HeadSpec, model, inputs, labels):
    outputs = model(**inputs, labels=labels) if labels is not None else model(**inputs)
    return spec.main_output(outputs), spec.scalar_loss(outputs)


def assert_close_to(reference: torch.Tensor, value: torch.Tensor, relative: float) -> None:
    assert torch.isfinite(value).all()
    scale = reference.abs().max().clamp_min(1.0)
    difference = (value.float() - reference).abs().max()
    assert difference <= relative * scale, f"max difference {difference:.4f} > {relative} x {scale:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_autocast_inference_is_close_to_fp32(spec: HeadSpec, dtype: torch.dtype) -> None:
    model = spec.build()
    inputs = spec.inputs(model.config, [7, 4])
    labels = spec.labels(model.config, inputs)
    with torch.no_grad():
        reference, reference_loss = outputs_and_loss(spec, model, inputs, labels)
        with torch.autocast("cpu", dtype=dtype):
            value, loss = outputs_and_loss(spec, model, inputs, labels)
    tolerance = BF16_RELATIVE_TOLERANCE if dtype == torch.bfloat16 else FP16_RELATIVE_TOLERANCE
    assert_close_to(reference, value, tolerance)
    if labels is not None:
        assert loss.dtype == torch.float32  # losses are computed in fp32
        assert_close_to(reference_loss, loss, tolerance)


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_bf16_autocast_training_step(spec: HeadSpec) -> None:
    model = spec.build().train()
    inputs = spec.inputs(model.config, [7, 4])
    labels = spec.labels(model.config, inputs)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = outputs_and_loss(spec, model, inputs, labels)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) >= 0.8 * len(before)


def test_fp16_training_with_loss_scaling() -> None:
    """fp16 autocast with a gradient scaler (the CPU supports both): finite loss, unscaled finite gradients."""
    spec = next(s for s in HEAD_SPECS if s.model_class.__name__ == "PerceiverForImageClassification")
    model = spec.build().train()
    inputs = spec.inputs(model.config, [1, 1, 1, 1])
    labels = spec.labels(model.config, inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = outputs_and_loss(spec, model, inputs, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_models_run_in_pure_half_precision(spec: HeadSpec, dtype: torch.dtype) -> None:
    """`model.to(dtype)` (as `from_pretrained(dtype=...)` gives): float inputs are cast to the model's dtype, and
    position features are computed in fp32 before the cast, so high frequencies stay accurate."""
    model = spec.build()
    inputs = spec.inputs(model.config, [7, 4])
    with torch.no_grad():
        reference = spec.main_output(model(**inputs))
        model.to(dtype)
        value = spec.main_output(model(**inputs))
    assert value.dtype == dtype
    assert_close_to(reference, value, 2 * BF16_RELATIVE_TOLERANCE if dtype == torch.bfloat16 else 0.02)


# PerceiverModel has no loss to train; the autoencoder's targets are a dict of modalities, which the shared tester
# does not build: its Trainer(bf16=True) run is test_multimodal_autoencoding.py::test_trainer_trains_it_in_bf16.
LABELLED_SPECS = [spec for spec in HEAD_SPECS if spec.make_labels is not None]


@pytest.mark.parametrize("spec", LABELLED_SPECS, ids=spec_ids(LABELLED_SPECS))
def test_trainer_trains_every_head_in_bf16(spec: HeadSpec, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = spec.build(seed=0).train()
    inputs = spec.inputs(model.config, [5, 3, 4, 2])
    columns = {**inputs, "labels": spec.labels(model.config, inputs)}
    dataset = Dataset.from_dict({name: values.tolist() for name, values in columns.items()}).with_format("torch")
    # The multimodal head takes its modalities as keywords (`**modalities`), which Trainer's column filter cannot
    # see in the signature: its users keep the columns (as tests/test_multimodal.py does).
    keep_columns = spec.model_class.__name__ == "PerceiverForMultimodalClassification"
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, bf16=True,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        remove_unused_columns=not keep_columns,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cpu_half_precision_attention_over_few_keys_runs_as_matmuls(monkeypatch) -> None:
    """With attn_implementation "sdpa", bf16 attention on CPU over few keys runs as matmuls (faster than SDPA's
    flash kernel there, benchmarks/run.py), through SDPA with many keys and in fp32; both give the same result."""
    from perceiver_hf import PerceiverConfig
    from perceiver_hf import modeling_perceiver as mp
    from perceiver_hf.modeling_perceiver import PerceiverAttention

    config = PerceiverConfig(num_latents=4, d_latents=16)
    config._attn_implementation = "sdpa"
    attention = PerceiverAttention(config, num_heads=2, q_channels=16, kv_channels=8).eval()
    x_q, x_kv = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = attention(x_q, x_kv)  # 5 keys: matmuls

    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(args[1].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        few_keys, _ = attention(x_q, x_kv)
    assert sdpa_calls == []
    torch.testing.assert_close(few_keys, expected)

    with torch.no_grad():
        attention(x_q, x_kv)  # fp32: SDPA
    assert len(sdpa_calls) == 1

    monkeypatch.setattr(mp, "MATMUL_ATTENTION_MAX_KEYS", 4)  # 5 keys are now "many": SDPA, same attention
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        many_keys, _ = attention(x_q, x_kv)
    assert len(sdpa_calls) == 2
    torch.testing.assert_close(many_keys, expected, atol=2e-2, rtol=2e-2)
