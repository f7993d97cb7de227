"""Tests of the building blocks and heads in `modeling_perceiver.py`.

Shapes of every module, both weight-sharing schemes of the encoder, padding invariance, batch
independence, eager == SDPA, attention weights, the masked-LM head's loss and decoding shortcut, and
the model-API snippet of the original Perceiver IO library. Tests parametrized over `HEAD_SPECS` run
for every head class (see `perceiver_tester.py`).
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
    PerceiverCrossAttentionLayer,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIO,
    PerceiverModel,
    PerceiverSelfAttentionBlock,
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


# ---------------------------------------------------------------------------------------------------
# Attention and layers
# ---------------------------------------------------------------------------------------------------


def padding_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def make_attention(attn_implementation: str = "sdpa") -> PerceiverAttention:
    # query-key width (8) != value width (12) != output width (10): every projection has its own shape.
    torch.manual_seed(0)
    return PerceiverAttention(
        num_heads=2,
        num_q_input_channels=10,
        num_kv_input_channels=6,
        num_qk_channels=8,
        num_v_channels=12,
        attn_implementation=attn_implementation,
    ).eval()


def test_attention_shapes_with_separate_qk_and_v_channels() -> None:
    attention = make_attention("eager")
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    out, weights = attention(x_q, x_kv, output_attentions=True)
    assert out.shape == (3, 4, 10)
    assert weights.shape == (3, 2, 4, 7)
    assert attention.q_proj.out_features == 8 and attention.v_proj.out_features == 12
    out, weights = attention(x_q, x_kv)
    assert weights is None

    wide = PerceiverAttention(2, 10, 6, num_qk_channels=8, num_v_channels=12, num_output_channels=5)
    assert wide(x_q, x_kv)[0].shape == (3, 4, 5)


@pytest.mark.parametrize(("qk", "v"), [(9, 12), (8, 7)])
def test_attention_rejects_channels_not_divisible_by_heads(qk: int, v: int) -> None:
    with pytest.raises(ValueError, match=r"must be divisible by num_heads \(2\)"):
        PerceiverAttention(2, 10, 6, num_qk_channels=qk, num_v_channels=v)


def test_attention_rejects_unknown_implementation() -> None:
    with pytest.raises(ValueError, match="attn_implementation.*flash"):
        PerceiverAttention(2, 8, 8, attn_implementation="flash")


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_attention_eager_equals_sdpa(masked: bool) -> None:
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    mask = padding_mask([7, 4, 1], 7) if masked else None
    eager, sdpa = make_attention("eager"), make_attention("sdpa")
    torch.testing.assert_close(eager(x_q, x_kv, mask)[0], sdpa(x_q, x_kv, mask)[0], atol=ATOL, rtol=0)


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
        2, 10, 6, num_qk_channels=8, num_v_channels=4, widening_factor=2, use_query_residual=use_query_residual
    )
    x_q, x_kv = torch.randn(3, 4, 10), torch.randn(3, 7, 6)
    out, weights = layer(x_q, x_kv, padding_mask([7, 2, 5], 7), output_attentions=True)
    assert out.shape == (3, 4, 10)
    assert weights.shape == (3, 2, 4, 7)
    assert layer.mlp.fc1.out_features == 20


@pytest.mark.parametrize("hidden_act", ["gelu", "geglu"])
def test_self_attention_layer_and_block_shapes(hidden_act: str) -> None:
    layer = PerceiverSelfAttentionLayer(2, 16, num_qk_channels=8, widening_factor=3, hidden_act=hidden_act)
    x = torch.randn(3, 5, 16)
    out, weights = layer(x, output_attentions=True)
    assert out.shape == (3, 5, 16)
    assert weights.shape == (3, 2, 5, 5)
    block = PerceiverSelfAttentionBlock(3, num_heads=2, num_channels=16)
    assert len(block) == 3 and len({id(layer) for layer in block}) == 3  # three layers, own weights each


# ---------------------------------------------------------------------------------------------------
# Encoder: shapes and the two weight-sharing schemes
# ---------------------------------------------------------------------------------------------------


def make_encoder(**kwargs) -> PerceiverEncoder:
    torch.manual_seed(0)
    defaults = dict(
        input_adapter=TextInputAdapter(vocab_size=30, max_seq_len=10, num_input_channels=12),
        latent_shape=(5, 16),
        num_self_attention_layers_per_block=2,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
    )
    defaults.update(kwargs)
    return PerceiverEncoder(**defaults).eval()


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
    encoder = make_encoder(input_adapter=None, num_input_channels=7)
    assert encoder(torch.randn(2, 9, 7)).last_hidden_state.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="num_input_channels"):
        make_encoder(input_adapter=None)
    with pytest.raises(ValueError, match=r"\(batch, positions, 7\)"):
        encoder(torch.randn(2, 9, 8))


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
    assert shared.self_attention_n is None and shared.cross_attention_n is None
    assert num_parameters(shared) == num_parameters(single)
    # Same weights (identical state-dict keys), but the shared model applies its block three times.
    single.load_state_dict(shared.state_dict())
    calls = [count_calls(layer) for layer in shared.self_attention_1]
    input_ids = torch.randint(0, 30, (2, 7))
    out = shared(input_ids, output_hidden_states=True)
    assert [c[0] for c in calls] == [3, 3]
    assert len(out.hidden_states) == 1 + 1 + 3 * 2
    assert not torch.allclose(out.last_hidden_state, single(input_ids).last_hidden_state)


def test_encoder_original_perceiver_scheme_shares_layers_after_the_first() -> None:
    """`num_layers=3`: layer 1 (cross-attention + block) has its own weights, layers 2 and 3 share one set."""
    encoders = {n: make_encoder(num_layers=n) for n in (1, 2, 3)}
    three = encoders[3]
    assert three.num_cross_attention_layers == 3 and three.num_self_attention_blocks == 3
    assert three.cross_attention_n is not None and three.cross_attention_n is not three.cross_attention_1
    assert three.self_attention_n is not None and three.self_attention_n is not three.self_attention_1
    # Layers 2.. share weights: a third layer adds no parameters, a second one adds a full set.
    assert num_parameters(encoders[3]) == num_parameters(encoders[2]) > num_parameters(encoders[1])
    extra = num_parameters(three.cross_attention_n) + num_parameters(three.self_attention_n)
    assert num_parameters(encoders[2]) - num_parameters(encoders[1]) == extra
    # No parameter is registered under two names (the state dict has one entry per weight).
    assert len(three.state_dict()) == len(dict(three.named_parameters())) + len(dict(three.named_buffers()))

    first_cross, later_cross = count_calls(three.cross_attention_1), count_calls(three.cross_attention_n)
    first_block = count_calls(three.self_attention_1[0])
    later_block = count_calls(three.self_attention_n[0])
    out = three(torch.randint(0, 30, (2, 7)), output_attentions=True)
    assert (first_cross[0], later_cross[0], first_block[0], later_block[0]) == (1, 2, 1, 2)
    assert len(out.cross_attentions) == 3 and len(out.attentions) == 3 * 2


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
    encoder = original.encoder
    assert encoder.cross_attention_n is not None and encoder.self_attention_n is not None
    deepmind = PerceiverModel(tiny_text_config(num_self_attention_blocks=3))
    assert deepmind.encoder.cross_attention_n is None and deepmind.encoder.self_attention_n is None
    out = deepmind(input_ids=torch.randint(1, 41, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 1 + 1 + 3 * 2


# ---------------------------------------------------------------------------------------------------
# Decoder and PerceiverIO
# ---------------------------------------------------------------------------------------------------


def test_decoder_with_trainable_queries() -> None:
    single = PerceiverDecoder(
        ClassificationOutputAdapter(4, num_output_channels=12), latent_shape=(5, 16), num_cross_attention_heads=2
    )
    latents = torch.randn(3, 5, 16)
    out = single(latents, output_attentions=True)
    assert single.output_query.shape == (1, 12)
    assert out.logits.shape == (3, 4)
    assert out.last_hidden_state.shape == (3, 1, 12)
    assert out.cross_attentions.shape == (3, 2, 1, 5)

    several = PerceiverDecoder(
        ClassificationOutputAdapter(4, num_outputs=3, num_output_channels=12),
        latent_shape=(5, 16),
        num_cross_attention_heads=2,
    )
    assert several(latents).logits.shape == (3, 3, 4)


def test_decoder_with_given_queries() -> None:
    decoder = PerceiverDecoder(
        TextOutputAdapter(vocab_size=30, max_seq_len=10, num_output_channels=8),
        latent_shape=(5, 16),
        num_cross_attention_heads=2,
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


# Issue 2's model-API snippet, character for character (the original library's, with the import changed).
MODEL_API_SNIPPET = """
from perceiver_hf import ImageInputAdapter, ClassificationOutputAdapter
from perceiver_hf import PerceiverIO, PerceiverEncoder, PerceiverDecoder
latent_shape = (32, 128)
input_adapter = ImageInputAdapter(image_shape=(28, 28, 1), num_frequency_bands=32)
output_adapter = ClassificationOutputAdapter(num_classes=10, num_output_channels=128)
encoder = PerceiverEncoder(input_adapter=input_adapter, latent_shape=latent_shape, num_layers=3,
    num_cross_attention_heads=4, num_self_attention_heads=4,
    num_self_attention_layers_per_block=3, dropout=0.0)
decoder = PerceiverDecoder(output_adapter=output_adapter, latent_shape=latent_shape,
    num_cross_attention_heads=1, dropout=0.0)
mnist_classifier = PerceiverIO(encoder, decoder)   # (B, 28, 28, 1) -> (B, 10) logits
"""


def test_model_api_snippet_of_the_original_library_runs_as_written() -> None:
    """The snippet runs unchanged, maps (B, 28, 28, 1) images to (B, 10) logits, and can learn."""
    namespace: dict = {}
    exec(MODEL_API_SNIPPET, namespace)
    mnist_classifier, input_adapter = namespace["mnist_classifier"], namespace["input_adapter"]
    assert isinstance(mnist_classifier, PerceiverIO)

    images = torch.rand(4, 28, 28, 1)
    logits = mnist_classifier(images)
    assert logits.shape == (4, 10)
    # The Fourier features of a 28x28 grid with 32 bands: 2 axes x (2 x 32 + 1) channels, plus the pixel.
    assert input_adapter.num_input_channels == 1 + 2 * (2 * 32 + 1)
    # channels-first input gives the same logits
    torch.testing.assert_close(mnist_classifier(images.permute(0, 3, 1, 2)), logits)

    # A few optimizer steps on a fixed random batch reduce the loss (the model can learn).
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(mnist_classifier.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(mnist_classifier(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_perceiver_io_rejects_mismatched_latent_widths() -> None:
    encoder = make_encoder()
    decoder = PerceiverDecoder(ClassificationOutputAdapter(3), latent_shape=(5, 8), num_cross_attention_heads=1)
    with pytest.raises(ValueError, match=r"encoder latent channels \(16\).*\(8\)"):
        PerceiverIO(encoder, decoder)


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
    assert {m.attn_implementation for m in attention_modules(sdpa)} == {"sdpa"}
    assert {m.attn_implementation for m in attention_modules(eager)} == {"eager"}
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
    assert len(modules) >= 3 and {m.attn_implementation for m in modules} == {"eager"}
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(spec.main_output(model(**inputs)), expected, atol=ATOL, rtol=0)
    model.set_attn_implementation("sdpa")
    assert {m.attn_implementation for m in attention_modules(model)} == {"sdpa"}
    with pytest.raises(ValueError, match="attn_implementation"):
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


@pytest.mark.parametrize("spec", TEXT_HEAD_SPECS, ids=spec_ids(TEXT_HEAD_SPECS))
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
