"""Tests of the building blocks and heads in `modeling_perceiver.py`.

Shapes of every module, the encoder's weight-sharing patterns (DeepMind's, the original Perceiver's, any explicit
pattern), padding invariance, batch independence, eager == SDPA, attention weights, the attention interface, the
masked-LM head's loss and decoding shortcut. Tests parametrized over `HEAD_SPECS` run for every head class (see
`perceiver_tester.py`). The older APIs built on these blocks are tested in `test_mirror_*.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from perceiver_tester import (
    HEAD_SPECS,
    TEXT_HEAD_SPECS,
    HeadSpec,
    exported_head_classes,
    select_rows,
    spec_ids,
    text_batch,
    tiny_text_config,
)
from torch import nn
from transformers import AutoModelForMaskedLM

from perceiver_hf import (
    ClassificationOutputAdapter,
    ImageInputAdapter,
    PerceiverAttention,
    PerceiverConfig,
    PerceiverCrossAttentionLayer,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverModel,
    PerceiverSelfAttentionLayer,
    TextInputAdapter,
    TextOutputAdapter,
)

ATOL = 1e-5


def attention_modules(model: nn.Module) -> list[PerceiverAttention]:
    return [module for module in model.modules() if isinstance(module, PerceiverAttention)]


def num_parameters(module: nn.Module) -> int:
    # `parameters()` yields a shared parameter once, so shared weights count once.
    return sum(p.numel() for p in module.parameters())


def block_config(**overrides) -> PerceiverConfig:
    """A config for the blocks alone: adapted inputs of 12 channels, 5 latents of 16 channels."""
    settings = dict(
        input_adapter="none",
        input_adapter_config={"num_input_channels": 12},
        num_latents=5,
        d_latents=16,
        num_self_attention_layers_per_block=2,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
    )
    settings.update(overrides)
    return PerceiverConfig(**settings)


# ---------------------------------------------------------------------------------------------------
# Attention and layers
# ---------------------------------------------------------------------------------------------------


def padding_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def make_attention(attn_implementation: str = "sdpa", **overrides) -> PerceiverAttention:
    # query-key width (8) != value width (12) != output width (10): every projection has its own shape.
    torch.manual_seed(0)
    config = block_config(attn_implementation=attn_implementation, **overrides)
    return PerceiverAttention(config, 2, 10, 6, qk_channels=8, v_channels=12).eval()


def test_attention_shapes_with_separate_qk_and_v_channels() -> None:
    attention = make_attention("eager")
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    out, weights = attention(x_q, x_kv, output_attentions=True)
    assert out.shape == (3, 4, 10)
    assert weights.shape == (3, 2, 4, 7)
    assert attention.q_proj.out_features == 8 and attention.v_proj.out_features == 12
    out, weights = attention(x_q, x_kv)
    assert weights is None

    wide = PerceiverAttention(block_config(), 2, 10, 6, qk_channels=8, v_channels=12, out_channels=5)
    assert wide(x_q, x_kv)[0].shape == (3, 4, 5)


@pytest.mark.parametrize(("qk", "v"), [(9, 12), (8, 7)])
def test_attention_rejects_channels_not_divisible_by_heads(qk: int, v: int) -> None:
    with pytest.raises(ValueError, match=r"must be divisible by num_heads \(2\)"):
        PerceiverAttention(block_config(), 2, 10, 6, qk_channels=qk, v_channels=v)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_projection_biases_follow_the_config(qkv_bias: bool) -> None:
    """lucidrains' and the fork's attention has no query/key/value biases (the key bias would get no gradient:
    softmax ignores it); DeepMind's has them. The output projection always has one."""
    attention = make_attention(qkv_bias=qkv_bias)
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert (projection.bias is not None) == qkv_bias
    assert attention.o_proj.bias is not None
    x_q, x_kv = torch.randn(2, 4, 10), torch.randn(2, 7, 6)
    attention(x_q, x_kv)[0].sum().backward()
    assert all(p.grad is not None for p in attention.parameters())


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_attention_eager_equals_sdpa(masked: bool) -> None:
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    mask = padding_mask([7, 4, 1], 7) if masked else None
    eager, sdpa = make_attention("eager"), make_attention("sdpa")
    torch.testing.assert_close(eager(x_q, x_kv, mask)[0], sdpa(x_q, x_kv, mask)[0], atol=ATOL, rtol=0)


def test_attention_runs_through_the_transformers_attention_interface(monkeypatch) -> None:
    """The attention function is looked up in transformers' `ALL_ATTENTION_FUNCTIONS` by the config's
    implementation, so a kernel registered there is used by every Perceiver attention module."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), module.is_causal))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    attention = make_attention("sdpa")
    attention.config._attn_implementation = "counting_sdpa"
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    mask = padding_mask([7, 4, 1], 7)
    out = attention(x_q, x_kv, mask)[0]
    assert calls == [((3, 2, 4, 4), (3, 2, 7, 4), False)]
    torch.testing.assert_close(out, make_attention("eager")(x_q, x_kv, mask)[0], atol=ATOL, rtol=0)


def test_attention_weights_are_distributions_without_padded_positions() -> None:
    attention = make_attention("sdpa")  # output_attentions takes the eager path even under "sdpa"
    lengths = [7, 4, 1]
    mask = padding_mask(lengths, 7)
    _, weights = attention(torch.randn(3, 4, 10), torch.randn(3, 7, 6), mask, output_attentions=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 4))
    padded = ~mask.bool()[:, None, None, :].expand_as(weights)
    assert torch.all(weights[padded] == 0)
    assert torch.all(weights[~padded] > 0)


def test_attention_ignores_padded_values() -> None:
    """Whatever sits at a masked-out position cannot leak into the output."""
    attention = make_attention("sdpa")
    x_q, x_kv = torch.randn(2, 4, 10), torch.randn(2, 7, 6)
    mask = padding_mask([5, 3], 7)
    changed = x_kv.clone()
    changed[0, 5:] = 100.0
    changed[1, 3:] = -50.0
    torch.testing.assert_close(attention(x_q, x_kv, mask)[0], attention(x_q, changed, mask)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_query_residual", [True, False])
def test_cross_attention_layer_shapes(use_query_residual: bool) -> None:
    layer = PerceiverCrossAttentionLayer(
        block_config(), 2, 10, 6, qk_channels=8, v_channels=4, widening_factor=2, use_query_residual=use_query_residual
    )
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    out, weights = layer(x_q, x_kv, padding_mask([7, 2, 5], 7), output_attentions=True)
    assert out.shape == (3, 4, 10)
    assert weights.shape == (3, 2, 4, 7)
    assert layer.mlp.fc1.out_features == 20


def test_cross_attention_layer_without_mlp() -> None:
    """lucidrains' Perceiver IO decoder: attention only, no feed-forward (`decoder_use_mlp=False`)."""
    layer = PerceiverCrossAttentionLayer(block_config(), 2, 10, 6, use_query_residual=False, use_mlp=False)
    assert layer.mlp is None
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    attended = layer.attention(layer.q_norm(x_q), layer.kv_norm(x_kv))[0]
    torch.testing.assert_close(layer(x_q, x_kv)[0], attended)


@pytest.mark.parametrize("hidden_act", ["gelu", "geglu"])
def test_self_attention_layer_shapes(hidden_act: str) -> None:
    config = block_config(self_attention_qk_channels=8, self_attention_widening_factor=3, hidden_act=hidden_act)
    layer = PerceiverSelfAttentionLayer(config)
    x = torch.randn(3, 5, 16)
    out, weights = layer(x, output_attentions=True)
    assert out.shape == (3, 5, 16)
    assert weights.shape == (3, 2, 5, 5)
    # GEGLU gates half of a doubled hidden layer.
    assert layer.mlp.fc1.out_features == (2 if hidden_act == "geglu" else 1) * 3 * 16


# ---------------------------------------------------------------------------------------------------
# Encoder: shapes and weight sharing
# ---------------------------------------------------------------------------------------------------


def make_encoder(**overrides) -> PerceiverEncoder:
    torch.manual_seed(0)
    config = block_config(input_adapter="text", input_adapter_config=None, vocab_size=30, max_position_embeddings=10,
                          d_model=12, **overrides)  # fmt: skip
    return PerceiverEncoder(config, TextInputAdapter(vocab_size=30, max_seq_len=10, num_input_channels=12)).eval()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_encoder_shapes_and_outputs() -> None:
    encoder = make_encoder(num_self_attention_blocks=2)
    input_ids = torch.randint(0, 30, (3, 8))
    out = encoder(
        input_ids, attention_mask=padding_mask([8, 5, 2], 8), output_attentions=True, output_hidden_states=True
    )
    assert out.last_hidden_state.shape == (3, 5, 16)
    # initial latents, after the cross-attention, after each of 2 x 2 self-attention layers
    assert len(out.hidden_states) == 1 + 1 + 4
    assert [w.shape for w in out.cross_attentions] == [(3, 2, 5, 8)]
    assert [w.shape for w in out.attentions] == [(3, 2, 5, 5)] * 4


def test_encoder_without_adapter_takes_adapted_inputs() -> None:
    encoder = PerceiverEncoder(block_config(input_adapter_config={"num_input_channels": 7}))
    assert encoder(torch.randn(2, 9, 7)).last_hidden_state.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="needs an input adapter for input_adapter='text'"):
        PerceiverEncoder(tiny_text_config())
    with pytest.raises(ValueError, match=r"\(batch, positions, 7\)"):
        encoder(torch.randn(2, 9, 8))
    # One array per cross-attention layer (lucidrains' fork splits text embeddings across layers).
    two = PerceiverEncoder(
        block_config(
            input_adapter_config={"num_input_channels": 7}, num_cross_attention_layers=2, num_self_attention_blocks=2
        )  # fmt: skip
    )
    x = [torch.randn(2, 9, 7), torch.randn(2, 9, 7)]
    assert two(x).last_hidden_state.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="1 per-layer arrays for 2 cross-attention layers"):
        two([x[0]])


def test_encoder_rejects_bad_attention_masks() -> None:
    encoder = make_encoder()
    input_ids = torch.randint(0, 30, (2, 6))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        encoder(input_ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"rows \[1\] mask out every input position"):
        encoder(input_ids, attention_mask=padding_mask([6, 0], 6))


def test_encoder_deepmind_scheme_repeats_one_shared_block() -> None:
    """One cross-attention layer, then the same self-attention block applied 3 times."""
    shared = make_encoder(num_self_attention_blocks=3, first_self_attention_block_shared=True)
    single = make_encoder(num_self_attention_blocks=1)
    assert list(shared.self_attention) == ["0_0", "0_1"] and list(shared.cross_attention) == ["0"]
    assert num_parameters(shared) == num_parameters(single)
    # Same weights (identical state-dict keys), but the shared model applies its block three times.
    single.load_state_dict(shared.state_dict())
    calls = [count_calls(layer) for layer in shared.self_attention.values()]
    input_ids = torch.randint(0, 30, (2, 7))
    out = shared(input_ids, output_hidden_states=True)
    assert [c[0] for c in calls] == [3, 3]
    assert len(out.hidden_states) == 1 + 1 + 3 * 2
    assert not torch.allclose(out.last_hidden_state, single(input_ids).last_hidden_state)


def original_perceiver(num_layers: int) -> PerceiverEncoder:
    """The original Perceiver's sharing: layer 1 (cross-attention + block) its own weights, layers 2.. one set."""
    return make_encoder(
        num_cross_attention_layers=num_layers,
        num_self_attention_blocks=num_layers,
        first_self_attention_block_shared=False,
    )


def test_encoder_original_perceiver_scheme_shares_layers_after_the_first() -> None:
    encoders = {n: original_perceiver(n) for n in (1, 2, 3)}
    three = encoders[3]
    assert list(three.cross_attention) == ["0", "1"] and three.cross_attention_keys == ["0", "1", "1"]
    assert list(three.self_attention) == ["0_0", "0_1", "1_0", "1_1"]
    # Layers 2.. share weights: a third layer adds no parameters, a second one adds a full set.
    assert num_parameters(encoders[3]) == num_parameters(encoders[2]) > num_parameters(encoders[1])
    extra = sum(num_parameters(three.self_attention[key]) for key in ("1_0", "1_1"))
    assert num_parameters(encoders[2]) - num_parameters(encoders[1]) == extra + num_parameters(
        three.cross_attention["1"]
    )
    # No parameter is registered under two names (the state dict has one entry per weight).
    assert len(three.state_dict()) == len(dict(three.named_parameters())) + len(dict(three.named_buffers()))

    first_cross, later_cross = count_calls(three.cross_attention["0"]), count_calls(three.cross_attention["1"])
    first_block, later_block = count_calls(three.self_attention["0_0"]), count_calls(three.self_attention["1_0"])
    out = three(torch.randint(0, 30, (2, 7)), output_attentions=True)
    assert (first_cross[0], later_cross[0], first_block[0], later_block[0]) == (1, 2, 1, 2)
    assert len(out.cross_attentions) == 3 and len(out.attentions) == 3 * 2


def test_encoder_explicit_weight_sharing_pattern() -> None:
    """The multi-modality fork's pattern with weight tying: cross-attention layers 2.. share one set; the first
    latent layer of every block has its own weights, the others are shared across all blocks."""
    encoder = make_encoder(
        num_cross_attention_layers=3,
        num_self_attention_blocks=3,
        num_self_attention_layers_per_block=3,
        cross_attention_weight_sharing=[0, 1, 1],
        self_attention_weight_sharing=[[0, 1, 2], [3, 1, 2], [4, 1, 2]],
    )
    assert list(encoder.self_attention) == ["0_0", "0_1", "0_2", "1_0", "2_0"]
    assert encoder.self_attention_keys == [["0_0", "0_1", "0_2"], ["1_0", "0_1", "0_2"], ["2_0", "0_1", "0_2"]]
    calls = {key: count_calls(layer) for key, layer in encoder.self_attention.items()}
    encoder(torch.randint(0, 30, (2, 7)))
    assert {key: c[0] for key, c in calls.items()} == {"0_0": 1, "0_1": 3, "0_2": 3, "1_0": 1, "2_0": 1}
    # No sharing at all (lucidrains without weight tying): every position its own weights.
    untied = make_encoder(
        num_cross_attention_layers=2,
        num_self_attention_blocks=2,
        cross_attention_weight_sharing=[0, 1],
        self_attention_weight_sharing=[[0, 1], [2, 3]],
    )
    assert len(untied.cross_attention) == 2 and len(untied.self_attention) == 4


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("cross_attention_weight_sharing", [0, 2], "in order of first use"),
        ("cross_attention_weight_sharing", [0], "one weight set per cross-attention layer"),
        ("self_attention_weight_sharing", [[0, 1]], "lists of num_self_attention_layers_per_block"),
        ("self_attention_weight_sharing", [[1, 0], [0, 1]], "in order of first use"),
    ],
)
def test_config_rejects_bad_weight_sharing_patterns(setting, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        block_config(num_cross_attention_layers=2, num_self_attention_blocks=2, **{setting: value})


def test_encoder_self_attention_block_residual() -> None:
    """The fork adds the block's input to its output (`x = latent_transformer(x) + x`)."""
    plain = make_encoder()
    residual = make_encoder(self_attention_block_residual=True)
    residual.load_state_dict(plain.state_dict())
    input_ids = torch.randint(0, 30, (2, 7))
    hidden = plain(input_ids, output_hidden_states=True).hidden_states
    after_cross, after_block = hidden[1], hidden[-1]
    torch.testing.assert_close(residual(input_ids).last_hidden_state, after_block + after_cross)


def test_encoder_rejects_more_cross_attention_layers_than_blocks() -> None:
    with pytest.raises(ValueError, match=r"num_cross_attention_layers \(3\).*num_self_attention_blocks \(2\)"):
        make_encoder(num_cross_attention_layers=3, num_self_attention_blocks=2)


def test_config_encoder_follows_the_sharing_flags() -> None:
    """The HF models build the same schemes from the config."""
    original = PerceiverModel(
        tiny_text_config(
            num_cross_attention_layers=3, num_self_attention_blocks=3, first_self_attention_block_shared=False
        )
    )
    assert original.config.weight_sharing == ([0, 1, 1], [[0, 1], [2, 3], [2, 3]])
    assert len(original.encoder.cross_attention) == 2 and len(original.encoder.self_attention) == 4
    deepmind = PerceiverModel(tiny_text_config(num_self_attention_blocks=3))
    assert len(deepmind.encoder.cross_attention) == 1 and len(deepmind.encoder.self_attention) == 2
    out = deepmind(input_ids=torch.randint(1, 41, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 1 + 1 + 3 * 2


# ---------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------


def test_decoder_with_trainable_queries() -> None:
    config = block_config(num_decoder_heads=2)
    single = PerceiverDecoder(config, ClassificationOutputAdapter(4, num_output_channels=12), use_query_residual=True)
    latents = torch.randn(3, 5, 16)
    out = single(latents, output_attentions=True)
    assert single.output_query.shape == (1, 12)
    assert out.logits.shape == (3, 4)
    assert out.last_hidden_state.shape == (3, 1, 12)
    assert out.cross_attentions.shape == (3, 2, 1, 5)

    several = PerceiverDecoder(
        config, ClassificationOutputAdapter(4, num_outputs=3, num_output_channels=12), use_query_residual=True
    )
    assert several(latents).logits.shape == (3, 3, 4)


def test_decoder_with_given_queries() -> None:
    decoder = PerceiverDecoder(
        block_config(num_decoder_heads=2),
        TextOutputAdapter(vocab_size=30, max_seq_len=10, num_output_channels=8),
        use_query_residual=False,
    )
    latents = torch.randn(3, 5, 16)
    assert decoder(latents).logits.shape == (3, 10, 30)  # all trainable queries
    assert decoder(latents, output_query=torch.randn(6, 8)).logits.shape == (3, 6, 30)  # (Q, E), shared
    per_example = torch.randn(3, 4, 8)
    out = decoder(latents, output_query=per_example)
    assert out.logits.shape == (3, 4, 30)
    # Queries are decoded independently: a slice of the queries gives the same slice of the outputs.
    torch.testing.assert_close(
        decoder(latents, output_query=per_example[:, :2]).logits, out.logits[:, :2], atol=ATOL, rtol=0
    )


def test_image_adapter_accepts_other_sizes_with_fourier_features() -> None:
    adapter = ImageInputAdapter(image_shape=(6, 5, 3), num_frequency_bands=3)
    assert adapter(torch.randn(2, 6, 5, 3)).shape == (2, 30, 3 + 2 * 7)
    assert adapter(torch.randn(2, 3, 4, 4)).shape == (2, 16, 3 + 2 * 7)
    with pytest.raises(ValueError, match="no axis of 3 channels"):
        adapter(torch.randn(2, 4, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Every head (the tiny-config tester)
# ---------------------------------------------------------------------------------------------------


def test_every_head_has_a_spec() -> None:
    """A new head class must be added to `HEAD_SPECS`, which runs the whole tester on it."""
    missing = {cls.__name__ for cls in exported_head_classes()} - {spec.id for spec in HEAD_SPECS}
    assert not missing, f"add a HeadSpec to tests/perceiver_tester.py for {sorted(missing)}"


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_head_output_shapes_and_loss(spec: HeadSpec) -> None:
    model = spec.build()
    config = model.config
    inputs = spec.inputs(config, lengths=[9, 6])
    with torch.no_grad():
        outputs = model(**inputs)
    assert spec.main_output(outputs).shape == spec.output_shape(config, 2, 9)
    assert torch.isfinite(spec.main_output(outputs)).all()
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], spec.main_output(outputs))

    labels = spec.labels(config, inputs)
    if labels is not None:
        loss = model(**inputs, labels=labels).loss
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_head_eager_equals_sdpa(spec: HeadSpec) -> None:
    sdpa = spec.build(attn_implementation="sdpa")
    eager = spec.build(attn_implementation="eager")
    assert {m.config._attn_implementation for m in attention_modules(sdpa)} == {"sdpa"}
    assert {m.config._attn_implementation for m in attention_modules(eager)} == {"eager"}
    for lengths in ([9, 9], [9, 4]):  # without, then with padding (text heads)
        inputs = spec.inputs(sdpa.config, lengths)
        with torch.no_grad():
            expected = spec.main_output(sdpa(**inputs))
            actual = spec.main_output(eager(**inputs))
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_set_attn_implementation_switches_every_attention_module(spec: HeadSpec) -> None:
    model = spec.build()
    inputs = spec.inputs(model.config, [9, 5])
    with torch.no_grad():
        expected = spec.main_output(model(**inputs))
    model.set_attn_implementation("eager")
    modules = attention_modules(model)
    assert len(modules) >= 3 and {m.config._attn_implementation for m in modules} == {"eager"}
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(spec.main_output(model(**inputs)), expected, atol=ATOL, rtol=0)
    model.set_attn_implementation("sdpa")
    assert {m.config._attn_implementation for m in attention_modules(model)} == {"sdpa"}
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_head_batch_independence(spec: HeadSpec) -> None:
    """An example's output does not depend on the other examples of its batch (nor on their padding)."""
    model = spec.build()
    batch = spec.inputs(model.config, lengths=[9, 3, 7], seed=1)
    alone = select_rows(batch, slice(1, 2))
    if spec.is_text:  # also drop the padding that only the batch's longer neighbours needed
        alone = {key: value[:, :3] for key, value in alone.items()}
    with torch.no_grad():
        in_batch = spec.main_output(model(**batch))[1:2]
        single = spec.main_output(model(**alone))
    if spec.position_wise:
        in_batch = in_batch[:, :3]
    torch.testing.assert_close(single, in_batch, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", TEXT_HEAD_SPECS, ids=spec_ids(TEXT_HEAD_SPECS))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_head_padding_invariance(spec: HeadSpec, attn_implementation: str) -> None:
    """Appending masked-out padding leaves the outputs of the real positions unchanged."""
    model = spec.build(attn_implementation=attn_implementation)
    short = spec.inputs(model.config, lengths=[6, 4], seed=2)
    padded = {
        "input_ids": F.pad(short["input_ids"], (0, 5), value=model.config.pad_token_id),
        "attention_mask": F.pad(short["attention_mask"], (0, 5), value=0),
    }
    # Padding must be masked out to be ignored: fill it with real-looking tokens to prove the mask works.
    padded["input_ids"][:, 6:] = torch.randint(1, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        expected = spec.main_output(model(**short))
        actual = spec.main_output(model(**padded))
    if spec.position_wise:
        assert actual.shape[1] == 11
        actual = actual[:, :6]
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_encoder_padding_invariance() -> None:
    encoder = make_encoder()
    input_ids = torch.randint(0, 30, (2, 6))
    mask = padding_mask([6, 3], 6)
    longer = torch.cat([input_ids, torch.randint(0, 30, (2, 4))], dim=1)
    longer_mask = F.pad(mask, (0, 4), value=0)
    torch.testing.assert_close(
        encoder(longer, longer_mask).last_hidden_state, encoder(input_ids, mask).last_hidden_state, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_output_attentions(spec: HeadSpec) -> None:
    model = spec.build()
    config = model.config
    inputs = spec.inputs(config, lengths=[8, 3])
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    num_layers = config.num_self_attention_blocks * config.num_self_attention_layers_per_block
    assert len(outputs.attentions) == num_layers
    for weights in outputs.attentions:
        assert weights.shape == (2, config.num_self_attention_heads, config.num_latents, config.num_latents)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # Cross-attention weights: the encoder's (latents -> inputs), then the decoder's (queries -> latents) for the
    # heads that have a decoder; each a distribution over what it attends to.
    cross = outputs.cross_attentions
    assert cross is not None and len(cross) >= config.num_cross_attention_layers
    encoder_cross = cross[: config.num_cross_attention_layers]
    for weights in encoder_cross:
        assert weights.shape[:3] == (2, config.num_cross_attention_heads, config.num_latents)
    for weights in cross:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    has_decoder = any(isinstance(m, PerceiverDecoder) for m in model.modules())
    assert len(cross) == config.num_cross_attention_layers + has_decoder
    if has_decoder:
        assert cross[-1].shape[0] == 2 and cross[-1].shape[-1] == config.num_latents
    with torch.no_grad():
        assert model(**inputs).cross_attentions is None  # only on request


def test_encoder_cross_attention_weights_skip_padding() -> None:
    model = HEAD_SPECS[0].build()
    config = model.config
    input_ids, attention_mask = text_batch(config, lengths=[8, 3])
    with torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    (weights,) = outputs.cross_attentions
    assert weights.shape == (2, config.num_cross_attention_heads, config.num_latents, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert torch.all(weights[1, :, :, 3:] == 0)
    assert torch.all(weights[1, :, :, :3] > 0)


# ---------------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------------


def make_mlm(**overrides) -> PerceiverForMaskedLM:
    torch.manual_seed(0)
    return PerceiverForMaskedLM(tiny_text_config(**overrides)).eval()


@pytest.mark.parametrize("seq_len", [1, 5, 12])
def test_mlm_logits_cover_the_input_length(seq_len: int) -> None:
    model = make_mlm()
    input_ids, attention_mask = text_batch(model.config, [seq_len, seq_len])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (2, seq_len, model.config.vocab_size)


def test_mlm_rejects_inputs_longer_than_max_position_embeddings() -> None:
    model = make_mlm()
    input_ids, _ = text_batch(model.config, [13])
    with pytest.raises(ValueError, match=r"length 13.*12 positions \(max_position_embeddings\)"):
        model(input_ids=input_ids)


def test_mlm_rejects_labels_of_another_shape() -> None:
    model = make_mlm()
    input_ids, _ = text_batch(model.config, [5, 5])
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(input_ids=input_ids, labels=input_ids[:, :4])


def test_mlm_loss_ignores_unlabelled_positions() -> None:
    model = make_mlm()
    spec = HEAD_SPECS[1]
    inputs = spec.inputs(model.config, [10, 7])
    labels = spec.labels(model.config, inputs)
    with torch.no_grad():
        outputs = model(**inputs, labels=labels)
    keep = labels != -100
    assert 0 < keep.sum() < labels.numel()
    expected = F.cross_entropy(outputs.logits[keep], labels[keep])
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_mlm_decode_masked_only_gives_the_full_decoding_loss(attn_implementation: str) -> None:
    """In training mode the decoder may decode only the labelled positions: same loss, same gradients."""
    full = make_mlm(decode_masked_only=False, attn_implementation=attn_implementation).train()
    masked_only = make_mlm(decode_masked_only=True, attn_implementation=attn_implementation).train()
    masked_only.load_state_dict(full.state_dict())
    spec = HEAD_SPECS[1]
    inputs = spec.inputs(full.config, [12, 8, 5])
    labels = spec.labels(full.config, inputs)

    decoded_queries = []
    masked_only.decoder.cross_attention.register_forward_hook(
        lambda module, args, output: decoded_queries.append(args[0].shape[1])
    )
    full_out = full(**inputs, labels=labels)
    masked_out = masked_only(**inputs, labels=labels)
    # The shortcut really decoded fewer positions (4 labelled in the longest row) ...
    assert decoded_queries == [int((labels != -100).sum(1).max())] and decoded_queries[0] < 12
    assert masked_out.logits is None and full_out.logits.shape == (3, 12, full.config.vocab_size)
    # ... and gives the loss and gradients of full decoding.
    torch.testing.assert_close(masked_out.loss, full_out.loss, atol=ATOL, rtol=0)
    full_out.loss.backward()
    masked_out.loss.backward()
    for (name, p_full), p_masked in zip(full.named_parameters(), masked_only.parameters(), strict=True):
        torch.testing.assert_close(p_masked.grad, p_full.grad, atol=ATOL, rtol=1e-4, msg=name)

    # Evaluation mode always decodes every position, so logits are available for metrics.
    masked_only.eval()
    with torch.no_grad():
        assert masked_only(**inputs, labels=labels).logits.shape == (3, 12, full.config.vocab_size)


def test_mlm_tied_and_untied_output_embedding() -> None:
    tied = make_mlm(tie_word_embeddings=True)
    untied = make_mlm(tie_word_embeddings=False)
    embedding = tied.perceiver.get_input_embeddings().weight
    assert tied.get_output_embeddings().weight is embedding
    assert untied.get_output_embeddings().weight is not untied.perceiver.get_input_embeddings().weight
    assert num_parameters(untied) - num_parameters(tied) == embedding.numel()
    # Training a tied model moves both ends together.
    with torch.no_grad():
        embedding[3].add_(1.0)
    torch.testing.assert_close(tied.get_output_embeddings().weight[3], embedding[3])


# ---------------------------------------------------------------------------------------------------
# Classification heads
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_labels", "labels", "expected_problem_type"),
    [
        (3, torch.tensor([0, 2]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
        (1, torch.tensor([0.5, -1.0]), "regression"),
    ],
)
def test_sequence_classification_loss_by_problem_type(
    num_labels: int, labels: torch.Tensor, expected_problem_type: str
) -> None:
    torch.manual_seed(0)
    model = PerceiverForSequenceClassification(tiny_text_config(num_labels=num_labels)).eval()
    input_ids, attention_mask = text_batch(model.config, [6, 4])
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert model.config.problem_type == expected_problem_type
    expected = {
        "single_label_classification": lambda: F.cross_entropy(outputs.logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(outputs.logits, labels),
        "regression": lambda: F.mse_loss(outputs.logits.squeeze(-1), labels),
    }[expected_problem_type]()
    torch.testing.assert_close(outputs.loss, expected)


def test_freeze_encoder_from_config() -> None:
    model = PerceiverForSequenceClassification(tiny_text_config(freeze_encoder=True))
    assert not any(p.requires_grad for p in model.perceiver.parameters())
    assert all(p.requires_grad for p in model.classification_decoder.parameters())
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.parameters()) and model.config.freeze_encoder is False


# ----------------------------------------------------------------------------------------------------------
# Resizing the learned positions of text models
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_class", [PerceiverForMaskedLM, PerceiverForSequenceClassification])
def test_resize_position_embeddings_keeps_trained_positions_and_round_trips(head_class, tmp_path) -> None:
    torch.manual_seed(0)
    model = head_class(tiny_text_config()).eval()
    input_ids, attention_mask = text_batch(model.config, [12, 7])
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits

    model.resize_position_embeddings(20)
    assert model.config.max_position_embeddings == 20
    assert model.get_position_embeddings().weight.shape == (20, model.config.d_model)
    if head_class is PerceiverForMaskedLM:
        assert model.decoder.output_query.shape == (20, model.config.d_model)
    # Inputs that fit the old table give the same outputs: the first 12 positions (and queries) are kept.
    after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Longer inputs now run, and the new size is saved with the model.
    long_ids, long_mask = text_batch(model.config, [20, 15], seed=1)
    expected = model(input_ids=long_ids, attention_mask=long_mask).logits
    model.save_pretrained(tmp_path)
    reloaded = head_class.from_pretrained(tmp_path).eval()
    assert reloaded.config.max_position_embeddings == 20
    torch.testing.assert_close(reloaded(input_ids=long_ids, attention_mask=long_mask).logits, expected)


def test_resize_position_embeddings_shrinks_and_keeps_a_frozen_encoder_frozen() -> None:
    model = PerceiverForSequenceClassification(tiny_text_config())
    old = model.get_position_embeddings().weight.detach().clone()
    model.freeze_encoder()
    model.resize_position_embeddings(5)
    new = model.get_position_embeddings().weight
    torch.testing.assert_close(new.detach(), old[:5], rtol=0, atol=0)
    assert not new.requires_grad
    with pytest.raises(ValueError, match="longer than the model's 5 positions"):
        model.perceiver(input_ids=torch.ones(1, 6, dtype=torch.long))
    # A trained masked LM's decoder is trained too: its new queries must be trainable parameters.
    mlm = PerceiverForMaskedLM(tiny_text_config())
    mlm.resize_position_embeddings(16)
    assert mlm.decoder.output_query.requires_grad
    assert any(p is mlm.decoder.output_query for p in mlm.parameters())


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied", "untied"])
def test_resize_token_embeddings_adds_token_ids(tie_word_embeddings: bool, tmp_path) -> None:
    """transformers' `resize_token_embeddings` (after adding tokens to a tokenizer): the old ids keep their
    logits, the new ids are accepted as inputs and labels, and the new size round-trips."""
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(tiny_text_config(tie_word_embeddings=tie_word_embeddings)).eval()
    old_vocab = model.config.vocab_size
    input_ids, attention_mask = text_batch(model.config, [9, 6])
    with torch.no_grad():  # a live graph would keep the old parameter shapes for backward (PyTorch, any model)
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits

    model.resize_token_embeddings(old_vocab + 9)
    assert model.config.vocab_size == old_vocab + 9
    assert model.perceiver.input_adapter.vocab_size == old_vocab + 9
    assert model.get_output_embeddings().out_features == old_vocab + 9
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(after[..., :old_vocab], before, rtol=0, atol=0)
    new_ids = torch.full_like(input_ids, old_vocab + 8)
    loss = model.train()(input_ids=new_ids, attention_mask=attention_mask, labels=new_ids).loss
    loss.backward()
    assert model.perceiver.input_adapter.token_embedding.weight.grad[old_vocab + 8].abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=new_ids).logits, model(input_ids=new_ids).logits)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64"])
def test_resize_position_embeddings_rejects_bad_sizes(bad) -> None:
    model = PerceiverForMaskedLM(tiny_text_config())
    with pytest.raises(ValueError, match=f"new_num_position_embeddings must be a positive integer, got {bad!r}"):
        model.resize_position_embeddings(bad)


def test_resize_position_embeddings_needs_a_text_model() -> None:
    from perceiver_tester import tiny_image_config

    from perceiver_hf import PerceiverForImageClassification

    model = PerceiverForImageClassification(tiny_image_config())
    with pytest.raises(ValueError, match="only text models .* input_adapter is 'image'"):
        model.resize_position_embeddings(8)


def test_perceiver_model_takes_every_processors_output() -> None:
    """`PerceiverModel` takes what each processor returns, by its name, and adapted inputs for "none"."""
    from perceiver_tester import audio_batch, multimodal_batch, tiny_audio_config, tiny_multimodal_config

    audio = PerceiverModel(tiny_audio_config()).eval()
    batch = audio_batch(audio.config, lengths=[10, 6])
    assert audio(**batch).last_hidden_state.shape == (2, audio.config.num_latents, audio.config.d_latents)

    multimodal = PerceiverModel(tiny_multimodal_config()).eval()
    batch = multimodal_batch(multimodal.config, [6, 4])
    data = {name: batch[name] for name in multimodal.input_adapter.modality_names}
    assert multimodal(inputs=data).last_hidden_state.shape[0] == 2

    adapted = PerceiverModel(block_config()).eval()
    assert adapted.input_adapter is None
    assert adapted(inputs_embeds=torch.randn(2, 9, 12)).last_hidden_state.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="input_adapter is 'none': it takes inputs_embeds"):
        adapted(input_ids=torch.randint(0, 5, (2, 9)))
    text = PerceiverModel(tiny_text_config()).eval()
    with pytest.raises(ValueError, match="input_adapter is 'text': it takes raw inputs, not inputs_embeds"):
        text(inputs_embeds=torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="pass exactly one of"):
        text(input_ids=torch.randint(0, 5, (2, 9)), pixel_values=torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Text context convolution and masked-LM queries built from the inputs
# ---------------------------------------------------------------------------------------------------


def test_text_context_convolution_mixes_neighbours_but_not_padding() -> None:
    torch.manual_seed(0)
    adapter = TextInputAdapter(vocab_size=30, max_seq_len=10, num_input_channels=8, context_kernel_size=3)
    ids = torch.randint(1, 30, (1, 6))
    alone, _ = adapter(ids)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    padded, returned_mask = adapter(padded_ids, mask)
    assert returned_mask is mask
    # Masked padding leaves the real positions' features as they are without it ...
    torch.testing.assert_close(padded[:, :6], alone)
    # ... while unmasked padding would reach the last token through the convolution,
    unmasked, _ = adapter(padded_ids)
    assert not torch.allclose(unmasked[:, 5], alone[:, 5])
    # and changing a neighbour changes a position's features (its own token and position staying the same).
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] % 29) + 1
    assert not torch.allclose(adapter(changed)[0][:, 2], alone[:, 2])
    torch.testing.assert_close(adapter(changed)[0][:, 0], alone[:, 0])  # 3 positions away: out of reach


@pytest.mark.parametrize("value", [0, 2, -1, True, 3.0, "3"])
def test_text_context_kernel_size_must_be_odd_positive(value: object) -> None:
    with pytest.raises(ValueError, match=r"context_kernel_size \(.*\) must be an odd positive integer or None"):
        tiny_text_config(context_kernel_size=value)


def test_mlm_decoder_queries_must_be_a_known_choice() -> None:
    with pytest.raises(ValueError, match=r"mlm_decoder_queries \('tokens'\) must be one of \['positions', 'inputs'\]"):
        tiny_text_config(mlm_decoder_queries="tokens")


def test_mlm_input_queries_own_no_query_table_and_resize_with_the_positions() -> None:
    model = make_mlm(mlm_decoder_queries="inputs", context_kernel_size=3)
    assert model.decoder.output_query is None
    assert model.decoder.cross_attention.use_query_residual
    assert not any("output_query" in name for name, _ in model.named_parameters())
    model.resize_position_embeddings(20)
    input_ids, attention_mask = text_batch(model.config, [20, 15])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (2, 20, model.config.vocab_size)


def test_mlm_input_queries_learn_a_local_rule_that_position_queries_do_not_yet() -> None:
    """Every second token is a function of the token before it. Queries built from the inputs with a context
    convolution predict it after a few hundred steps; DeepMind's position queries, trained the same way, are still
    on the plateau: the reason run_mlm.py defaults to the former."""

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, 20, (32, 12), generator=generator)
        ids[:, 1::2] = (ids[:, 0::2] * 7) % 19 + 1  # the rule: token 2k+1 follows from token 2k
        labels = torch.full_like(ids, -100)
        labels[:, 1::2] = ids[:, 1::2]
        masked = ids.clone()
        masked[:, 1::2] = 0  # the [MASK] id
        return masked, labels

    accuracies = {}
    for queries, kernel in [("inputs", 3), ("positions", None)]:
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(
            tiny_text_config(vocab_size=20, mlm_decoder_queries=queries, context_kernel_size=kernel)
        ).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(300):
            input_ids, labels = batch(generator)
            model(input_ids=input_ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        input_ids, labels = batch(torch.Generator().manual_seed(1))
        with torch.no_grad():
            predicted = model(input_ids=input_ids).logits.argmax(-1)
        accuracies[queries] = (predicted[:, 1::2] == labels[:, 1::2]).float().mean().item()
    assert accuracies["inputs"] > 0.95, accuracies
    assert accuracies["positions"] < 0.5, accuracies
