"""PEFT adapters on the attention projections take effect.

The cross-attention folds its key/value LayerNorm into the key and value projections when the inputs need no
gradient (pixels, Fourier features); that shortcut multiplies the projections' weights directly, so it is taken
only for plain `nn.Linear` layers. A LoRA adapter on `k_proj` / `v_proj` (or a hook on them) is called as itself:
the adapted model gives the merged model's outputs, with gradients or without.
"""

from __future__ import annotations

import pytest
import torch
from perceiver_tester import tiny_image_config

from perceiver_hf import PerceiverForImageClassification

peft = pytest.importorskip("peft", reason="peft is a test dependency (the testing extra); not installed here")


def adapted_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    base = PerceiverForImageClassification(tiny_image_config(num_labels=3)).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    return base, model


def test_lora_on_key_value_projections_changes_inference_as_merged() -> None:
    base, model = adapted_model()
    pixels = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        adapted = model(pixel_values=pixels).logits
        with model.disable_adapter():
            plain = model(pixel_values=pixels).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter is not ignored at inference
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, adapted, atol=1e-5, rtol=1e-5)
    # With gradients (training), the same outputs: folding is never what decides the result.
    model_again = adapted_model()[1]
    torch.testing.assert_close(model_again(pixel_values=pixels).logits, adapted, atol=1e-5, rtol=1e-5)


def test_lora_key_value_adapters_train() -> None:
    _, model = adapted_model()
    model.train()
    loss = model(pixel_values=torch.randn(2, 3, 6, 5), labels=torch.tensor([0, 2])).loss
    loss.backward()
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [name for name, p in model.named_parameters() if "lora_" not in name and p.requires_grad]
    assert not frozen  # PEFT freezes the base model


def test_forward_hooks_on_key_projection_are_called() -> None:
    """A hook on `k_proj` (e.g. a quantization observer) sees every call, also on the no-gradient path."""
    base, _ = adapted_model()
    calls = []
    k_proj = base.perceiver.encoder.cross_attention["0"].attention.k_proj
    k_proj.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        base(pixel_values=torch.randn(2, 3, 6, 5))
    assert calls and calls[0][:2] == (2, 30)
