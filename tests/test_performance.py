"""Cheap checks of the performance properties (issue 6); the timings themselves live in `benchmarks/`.

- the encoder compiles with `torch.compile(fullgraph=True)` (no graph break) and matches eager,
  forward and backward;
- the cross-attention keeps no (latents x inputs) attention matrix for the backward pass, so training
  memory grows with the inputs' own size only;
- the LayerNorm affine folded into the key/value projections (inputs without gradient) gives the
  unfolded function and gradients;
- gradient checkpointing shrinks what the backward pass keeps; Fourier features are cached; the
  masked-LM decoder runs on the labelled positions only in training.

The compile test uses the `aot_eager` backend: graph breaks are found while tracing, whatever the
backend, and it skips inductor's C++ code generation, which takes minutes on the 2-core test machines.
"""

from __future__ import annotations

import pytest
import torch
from perceiver_tester import image_batch, text_batch, tiny_image_config, tiny_text_config

from perceiver_hf import (
    PerceiverConfig,
    PerceiverCrossAttentionLayer,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverModel,
)

# Equal query-key and value widths: the case SDPA's flash kernel takes on CPU.
NUM_LATENTS = 6
TEXT_LEN = 11
IMAGE_SIZE = (7, 5)  # 35 input positions: no dimension of the model has this size


def _text_config(**overrides) -> PerceiverConfig:
    return tiny_text_config(
        self_attention_qk_channels=None, cross_attention_qk_channels=None, num_latents=NUM_LATENTS, **overrides
    )


def _image_config(**overrides) -> PerceiverConfig:
    return tiny_image_config(self_attention_v_channels=None, image_size=list(IMAGE_SIZE), num_latents=NUM_LATENTS,
                             num_cross_attention_heads=2, **overrides)  # fmt: skip


def _encoder_inputs(config: PerceiverConfig) -> tuple[dict[str, torch.Tensor], int]:
    """Inputs for `PerceiverModel` and their number of input positions N."""
    if config.input_adapter == "text":
        input_ids, attention_mask = text_batch(config, [TEXT_LEN, 7])
        return {"input_ids": input_ids, "attention_mask": attention_mask}, TEXT_LEN
    return {"pixel_values": image_batch(config, 2)}, IMAGE_SIZE[0] * IMAGE_SIZE[1]


def _saved_tensor_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for the backward pass while `fn()` runs."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


@pytest.mark.parametrize("make_config", [_text_config, _image_config], ids=["text", "image"])
def test_cross_attention_saves_no_latents_by_inputs_matrix(make_config) -> None:
    config = make_config()
    inputs, num_inputs = _encoder_inputs(config)
    attention_matrix = {(NUM_LATENTS, num_inputs), (num_inputs, NUM_LATENTS)}

    def has_attention_matrix(attn_implementation: str) -> bool:
        torch.manual_seed(0)
        model = PerceiverModel(make_config(attn_implementation=attn_implementation)).train()
        shapes = _saved_tensor_shapes(lambda: model(**inputs).last_hidden_state.sum())
        assert any(num_inputs in shape for shape in shapes)  # the hook does see the cross-attention
        return any(shape[-2:] in attention_matrix for shape in shapes if len(shape) >= 2)

    # The eager implementation keeps the softmax for its backward: proof that the check can fail.
    assert has_attention_matrix("eager")
    assert not has_attention_matrix("sdpa")


def test_folded_key_value_projection_matches_layer_norm_then_linear() -> None:
    """Inputs that need no gradient take the folded path; inputs that need one take the plain
    `LayerNorm -> Linear` path. Both must give the same keys, values and parameter gradients."""
    torch.manual_seed(0)
    config = PerceiverConfig(input_adapter="none", num_latents=4, d_latents=8)
    layer = PerceiverCrossAttentionLayer(config, num_heads=2, q_channels=8, kv_channels=12)
    with torch.no_grad():  # a non-trivial LayerNorm affine, so that folding it matters
        layer.kv_norm.weight.normal_(1.0, 0.5)
        layer.kv_norm.bias.normal_(0.0, 0.5)
    x_q, x_kv = torch.randn(3, 4, 8), torch.randn(3, 9, 12)

    def run(kv_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad()
        k, v = layer.project_kv(kv_input)
        out, _ = layer(x_q, None, kv=(k, v))
        (out.square().sum() + k.sum() + v.sum()).backward()
        return torch.cat([k.flatten(), v.flatten(), out.flatten()]).detach(), {
            name: p.grad.clone() for name, p in layer.named_parameters()
        }

    folded, folded_grads = run(x_kv)  # no gradient needed: folded affine
    plain, plain_grads = run(x_kv.clone().requires_grad_())
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)
    assert folded_grads["kv_norm.weight"].abs().sum() > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(folded_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("make_config", [_text_config, _image_config], ids=["text", "image"])
def test_encoder_compiles_without_graph_breaks_and_matches_eager(make_config) -> None:
    torch.manual_seed(0)
    model = PerceiverModel(make_config()).train()  # train mode: the backward is compiled too
    inputs, _ = _encoder_inputs(model.config)

    def loss_and_grads(module: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = module(**inputs).last_hidden_state
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
    actual, grads = loss_and_grads(compiled)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_shrinks_what_the_backward_keeps() -> None:
    def saved_bytes(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(_text_config(num_self_attention_layers_per_block=3)).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5's name of gradient_checkpointing_enable
        input_ids, attention_mask = text_batch(model.config, [TEXT_LEN, 7])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        sizes: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        # Checkpointed layers hold their activations through their own (inner) hooks and recompute them;
        # only what stays saved outside them reaches this hook.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return sum(sizes)

    assert saved_bytes(checkpointing=True) < 0.5 * saved_bytes(checkpointing=False)


def test_fourier_features_are_computed_once_per_shape() -> None:
    model = PerceiverForImageClassification(_image_config()).eval()
    encoding = model.perceiver.input_adapter.position_encoding
    calls = []
    original = torch.linspace

    def counting_linspace(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    torch.linspace = counting_linspace
    try:
        with torch.no_grad():
            for _ in range(3):
                model(pixel_values=image_batch(model.config, 2))
        computed_once = len(calls)
        model(pixel_values=torch.randn(1, 3, 4, 4))  # another size: computed (and cached) once more
    finally:
        torch.linspace = original
    assert computed_once > 0 and len(encoding._cache) == 2
    features = encoding(IMAGE_SIZE, torch.device("cpu"), torch.float32)
    assert features is encoding(IMAGE_SIZE, torch.device("cpu"), torch.float32)
    assert len(calls) == 2 * computed_once


def test_masked_lm_decodes_only_the_labelled_positions_in_training() -> None:
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(_text_config()).train()
    input_ids, attention_mask = text_batch(model.config, [TEXT_LEN, 7])
    labels = torch.full_like(input_ids, -100)
    labels[0, [1, 4, 8]] = 5
    labels[1, [2]] = 6
    decoded_queries = []
    model.decoder.output_adapter.register_forward_hook(lambda m, args, out: decoded_queries.append(args[0].shape[1]))
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    model.eval()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert decoded_queries == [3, TEXT_LEN]  # training: the most labels in a row; eval: every position
