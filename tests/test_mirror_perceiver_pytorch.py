"""`perceiver_hf.perceiver_pytorch`, the mirror of lucidrains' perceiver-pytorch 0.9.0 (commit 96097c6).

What lucidrains' own test checks (output shapes, with and without inverted cross-attention), plus: the README
examples run with the original's parameter counts; every tiny configuration has the original's parameter count;
weights are tied as lucidrains' `cache_fn(key=block_ind)` ties them; masked inputs do not affect the outputs; every
parameter is trained; and the outputs equal a forward pass written out here from lucidrains' code, on weights in the
original's state-dict layout loaded with `load_original_state_dict`.

Parameter counts (`ORIGINAL_COUNTS`) were measured with the original code (lucidrains/perceiver-pytorch commit
96097c6a, `sum(p.numel() for p in model.parameters())`) for the same arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mirror_reference import reference_attention

from perceiver_hf.perceiver_pytorch import Perceiver, PerceiverIO, PerceiverLM, load_original_state_dict
from perceiver_hf.perceiver_pytorch.perceiver_io import dropout_seq
from perceiver_hf.perceiver_pytorch.perceiver_pytorch import fourier_encode

TINY = dict(
    input_channels=3, input_axis=2, num_freq_bands=3, max_freq=5.0, depth=3, num_latents=8, latent_dim=16,
    cross_heads=1, latent_heads=2, cross_dim_head=8, latent_dim_head=8, num_classes=10,
)  # fmt: skip
TINY_IO = dict(
    dim=12, queries_dim=10, depth=3, num_latents=8, latent_dim=16, cross_heads=2, latent_heads=2, cross_dim_head=8,
    latent_dim_head=8,
)  # fmt: skip
TINY_LM = dict(
    num_tokens=50, dim=12, max_seq_len=16, depth=2, num_latents=8, latent_dim=16, latent_heads=2, cross_dim_head=8,
    latent_dim_head=8,
)  # fmt: skip

# Measured with the original code (see the module docstring).
ORIGINAL_COUNTS = [
    (Perceiver, TINY, 24_864),
    (Perceiver, dict(TINY, self_per_cross_attn=2), 37_824),
    (Perceiver, dict(TINY, self_per_cross_attn=2, weight_tie_layers=True), 25_326),
    (Perceiver, dict(TINY, fourier_encode_data=False, final_classifier_head=False), 23_906),
    (PerceiverIO, TINY_IO, 18_198),
    (PerceiverIO, dict(TINY_IO, logits_dim=7, decoder_ff=True), 19_585),
    (PerceiverIO, dict(TINY_IO, logits_dim=7, decoder_ff=True, weight_tie_layers=True), 10_945),
    (PerceiverLM, TINY_LM, 14_494),
    (PerceiverLM, dict(TINY_LM, decoder_ff=True, weight_tie_layers=True), 12_034),
]


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------------------
# lucidrains' test, README and parameter counts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inverted_cross_attn", [False, True, (True, False)])
def test_perceiver_output_shape(inverted_cross_attn):
    # lucidrains' tests/test_perceiver.py, on a smaller image.
    model = Perceiver(**dict(TINY, depth=2, num_latents=16), inverted_cross_attn=inverted_cross_attn)
    assert model(torch.randn(1, 12, 12, 3)).shape == (1, 10)


def test_readme_examples():
    # lucidrains' README, verbatim arguments; counts from the original code.
    model = Perceiver(
        input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=6, num_latents=256, latent_dim=512,
        cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=64, num_classes=1000, attn_dropout=0.0,
        ff_dropout=0.0, weight_tie_layers=False, fourier_encode_data=True, self_per_cross_attn=2,
    )  # fmt: skip
    assert num_params(model) == 70_395_972
    img = torch.randn(1, 224, 224, 3)  # 1 imagenet image, pixelized
    with torch.no_grad():
        assert model(img).shape == (1, 1000)
        assert model(img[:, :32, :32], return_embeddings=True).shape == (1, 256, 512)

    model = PerceiverIO(
        dim=32, queries_dim=32, logits_dim=100, depth=6, num_latents=256, latent_dim=512, cross_heads=1,
        latent_heads=8, cross_dim_head=64, latent_dim_head=64, weight_tie_layers=False, seq_dropout_prob=0.2,
    )  # fmt: skip
    assert num_params(model) == 28_636_548
    with torch.no_grad():
        assert model(torch.randn(1, 512, 32), queries=torch.randn(128, 32)).shape == (1, 128, 100)

    model = PerceiverLM(
        num_tokens=20000, dim=32, depth=6, max_seq_len=2048, num_latents=256, latent_dim=512, cross_heads=1,
        latent_heads=8, cross_dim_head=64, latent_dim_head=64, weight_tie_layers=False,
    )  # fmt: skip
    assert num_params(model) == 29_998_784
    seq = torch.randint(0, 20000, (1, 512))
    with torch.no_grad():
        assert model(seq, mask=torch.ones(1, 512).bool()).shape == (1, 512, 20000)


@pytest.mark.parametrize(("cls", "kwargs", "expected"), ORIGINAL_COUNTS)
def test_parameter_count_matches_original(cls, kwargs, expected):
    assert num_params(cls(**kwargs)) == expected


def test_weight_tie_layers_ties_as_cache_fn():
    # Untied: every layer its own weights. Tied: layer 1 its own; layers 2.. one cross-attention layer and, per
    # block position j, one self-attention layer (lucidrains' `cache_fn(key=block_ind)`).
    untied = Perceiver(**TINY, self_per_cross_attn=2).encoder
    assert untied.cross_attention_keys == ["0", "1", "2"]
    assert untied.self_attention_keys == [["0_0", "0_1"], ["1_0", "1_1"], ["2_0", "2_1"]]
    tied = Perceiver(**TINY, self_per_cross_attn=2, weight_tie_layers=True).encoder
    assert tied.cross_attention_keys == ["0", "1", "1"]
    assert tied.self_attention_keys == [["0_0", "0_1"], ["1_0", "1_1"], ["1_0", "1_1"]]
    # Perceiver IO's cache_fn has a single cache: all self-attention layers are one.
    assert PerceiverIO(**TINY_IO, weight_tie_layers=True).encoder.self_attention_keys == [["0_0"] * 3]


def test_inverted_attention_may_differ_within_tied_layers():
    # lucidrains passes the flag per call, so layers 2 and 3 (one weight set when tied) may attend differently.
    model = Perceiver(**TINY, weight_tie_layers=True, inverted_cross_attn=(False, True, False)).eval()
    assert model.encoder.cross_attention_keys == ["0", "1", "1"]
    assert model.config.cross_attention_inverted == [False, True, False]
    img = torch.randn(2, 5, 4, 3)
    uniform = Perceiver(**TINY, weight_tie_layers=True, inverted_cross_attn=(False, True, True)).eval()
    uniform.load_state_dict(model.state_dict())
    assert not torch.allclose(model(img), uniform(img))


# --------------------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------------------


def test_fourier_encode_by_hand():
    # Frequencies linearly spaced from 1 to max_freq / 2: sines, cosines, then the position itself.
    x = torch.tensor([0.5, -1.0])
    scales = torch.tensor([1.0, 1.75, 2.5])  # linspace(1, 5 / 2, 3)
    expected = torch.cat(
        [torch.sin(x[:, None] * scales * math.pi), torch.cos(x[:, None] * scales * math.pi), x[:, None]], dim=-1
    )
    torch.testing.assert_close(fourier_encode(x, max_freq=5.0, num_bands=3), expected)


def test_return_embeddings_and_no_classifier_head():
    model = Perceiver(**TINY).eval()
    img = torch.randn(2, 5, 4, 3)
    latents = model(img, return_embeddings=True)
    assert latents.shape == (2, 8, 16)
    head = model.to_logits
    torch.testing.assert_close(model(img), head[2](head[1](latents.mean(dim=1))))
    no_head = Perceiver(**TINY, final_classifier_head=False).eval()
    assert no_head(img).shape == (2, 8, 16)


def test_fourier_encode_data_false_takes_features_as_given():
    model = Perceiver(**dict(TINY, input_channels=5), fourier_encode_data=False)
    assert model.encoder.num_input_channels == 5
    assert model(torch.randn(2, 4, 3, 5)).shape == (2, 10)


@pytest.mark.parametrize("weight_tie_layers", [False, True])
def test_perceiver_mask_is_honoured(weight_tie_layers):
    model = Perceiver(**TINY, weight_tie_layers=weight_tie_layers).eval()
    img = torch.randn(2, 6, 5, 3)
    mask = torch.ones(2, 6, 5, dtype=torch.bool)
    mask[1, 4:] = False  # lucidrains: True = attend
    changed = img.clone()
    changed[1, 4:] = torch.randn(2, 5, 3)
    out = model(img, mask=mask)
    torch.testing.assert_close(model(changed, mask=mask), out)
    assert not torch.allclose(model(changed), model(img))
    # A flat (B, N) mask is the same mask.
    torch.testing.assert_close(model(img, mask=mask.flatten(1)), out)


def test_perceiver_io_queries_mask_and_logits():
    model = PerceiverIO(**TINY_IO, logits_dim=7, decoder_ff=True).eval()
    data, queries = torch.randn(2, 9, 12), torch.randn(5, 10)
    out = model(data, queries=queries)
    assert out.shape == (2, 5, 7)
    # 2-D queries are the same queries for every example.
    torch.testing.assert_close(model(data, queries=queries.expand(2, -1, -1)), out)
    assert model(data).shape == (2, 8, 16)  # no queries: the latents
    assert PerceiverIO(**TINY_IO)(data, queries=queries).shape == (2, 5, 10)  # logits_dim=None: no projection

    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    changed = data.clone()
    changed[0, 6:] = torch.randn(3, 12)
    torch.testing.assert_close(model(changed, mask=mask, queries=queries), model(data, mask=mask, queries=queries))


def test_seq_dropout_only_in_training():
    model = PerceiverIO(**TINY_IO, seq_dropout_prob=0.5)
    data, mask = torch.randn(2, 10, 12), torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    kept, kept_mask = dropout_seq(data, mask, 0.5)
    assert kept.shape == (2, 5, 12)
    assert kept_mask.sum(dim=1).tolist() == [5, 3]  # ceil(0.5 * unmasked count) positions stay attended
    model.eval()
    torch.testing.assert_close(model(data, mask=mask), model(data, mask=mask))
    model.train()
    assert model(data, mask=mask).shape == (2, 8, 16)


def test_perceiver_lm_mask_and_queries():
    model = PerceiverLM(**TINY_LM).eval()
    tokens = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    logits = model(tokens, mask=mask)
    assert logits.shape == (2, 11, 50)
    # A masked token is not attended to; it changes only its own output (it is also that position's query).
    changed = tokens.clone()
    changed[0, 8] = (tokens[0, 8] + 1) % 50
    other = model(changed, mask=mask)
    keep = torch.ones(11, dtype=torch.bool)
    keep[8] = False
    torch.testing.assert_close(other[0, keep], logits[0, keep])
    torch.testing.assert_close(other[1], logits[1])


def test_dropout_placement():
    # lucidrains: attn_dropout on the attention probabilities, ff_dropout at the end of the feed-forward; no
    # dropout on the attention output.
    model = Perceiver(**TINY, attn_dropout=0.1, ff_dropout=0.2)
    assert model.config.attention_dropout == 0.1
    for layer in [*model.encoder.cross_attention.values(), *model.encoder.self_attention.values()]:
        assert layer.dropout.p == 0.0 and layer.mlp.dropout.p == 0.2 and layer.mlp.hidden_dropout.p == 0.0
    img = torch.randn(2, 5, 4, 3)
    model.eval()
    torch.testing.assert_close(model(img), model(img))


def _train_cases():
    yield Perceiver(**TINY, self_per_cross_attn=2, inverted_cross_attn=(True, False, False)), (torch.randn(2, 5, 4, 3),)
    yield Perceiver(**TINY, weight_tie_layers=True), (torch.randn(2, 5, 4, 3),)
    yield PerceiverIO(**TINY_IO, logits_dim=10, decoder_ff=True), (torch.randn(2, 9, 12), None, torch.randn(2, 3, 10))
    yield PerceiverLM(**TINY_LM, decoder_ff=True), (torch.randint(0, 50, (2, 11)),)


@pytest.mark.parametrize("case", range(4))
def test_every_parameter_is_trained(case):
    model, args = list(_train_cases())[case]
    model(*args).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Against a forward pass written out from lucidrains' code, on weights in the original's layout
# --------------------------------------------------------------------------------------------------------------


def original_attention_params(prefix, query_dim, context_dim, heads, dim_head, with_context):
    inner = heads * dim_head
    params = {
        f"{prefix}norm.weight": 1 + 0.1 * torch.randn(query_dim),
        f"{prefix}norm.bias": 0.1 * torch.randn(query_dim),
        f"{prefix}fn.to_q.weight": torch.randn(inner, query_dim) / query_dim**0.5,
        f"{prefix}fn.to_kv.weight": torch.randn(2 * inner, context_dim) / context_dim**0.5,
        f"{prefix}fn.to_out.weight": torch.randn(query_dim, inner) / inner**0.5,
        f"{prefix}fn.to_out.bias": 0.1 * torch.randn(query_dim),
    }
    if with_context:
        params[f"{prefix}norm_context.weight"] = 1 + 0.1 * torch.randn(context_dim)
        params[f"{prefix}norm_context.bias"] = 0.1 * torch.randn(context_dim)
    return params


def original_ff_params(prefix, dim):
    return {
        f"{prefix}norm.weight": 1 + 0.1 * torch.randn(dim),
        f"{prefix}norm.bias": 0.1 * torch.randn(dim),
        f"{prefix}fn.net.0.weight": torch.randn(8 * dim, dim) / dim**0.5,  # GEGLU: 2 x (4 x dim)
        f"{prefix}fn.net.0.bias": 0.1 * torch.randn(8 * dim),
        f"{prefix}fn.net.2.weight": torch.randn(dim, 4 * dim) / (4 * dim) ** 0.5,
        f"{prefix}fn.net.2.bias": 0.1 * torch.randn(dim),
    }


def reference_ff(sd, prefix, x):
    """lucidrains' `PreNorm(FeedForward)` (GEGLU), written out."""
    x = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}norm.weight"], sd[f"{prefix}norm.bias"])
    h, gate = (x @ sd[f"{prefix}fn.net.0.weight"].T + sd[f"{prefix}fn.net.0.bias"]).chunk(2, dim=-1)
    return (h * F.gelu(gate)) @ sd[f"{prefix}fn.net.2.weight"].T + sd[f"{prefix}fn.net.2.bias"]


@pytest.mark.parametrize("inverted", [(False, False), (True, False)])
def test_perceiver_matches_written_out_forward(inverted):
    depth, per_cross, latent_dim, input_dim = 2, 2, 16, 3 + 2 * 7
    kwargs = dict(TINY, depth=depth, self_per_cross_attn=per_cross, cross_heads=2, inverted_cross_attn=inverted)
    sd = {"latents": torch.randn(8, latent_dim)}
    for i in range(depth):
        sd.update(original_attention_params(f"layers.{i}.0.", latent_dim, input_dim, 2, 8, with_context=True))
        sd.update(original_ff_params(f"layers.{i}.1.", latent_dim))
        for j in range(per_cross):
            sd.update(original_attention_params(f"layers.{i}.2.{j}.0.", latent_dim, latent_dim, 2, 8, False))
            sd.update(original_ff_params(f"layers.{i}.2.{j}.1.", latent_dim))
    sd.update({"to_logits.1.weight": torch.ones(latent_dim), "to_logits.1.bias": torch.zeros(latent_dim)})
    sd.update({"to_logits.2.weight": torch.randn(10, latent_dim), "to_logits.2.bias": torch.randn(10)})
    model = Perceiver(**kwargs).eval()
    load_original_state_dict(model, sd)

    img = torch.randn(2, 5, 4, 3)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False
    # Inputs: the data, then the Fourier features of linspace(-1, 1) positions on each axis.
    pos = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 4), indexing="ij"), dim=-1)
    features = torch.cat([img, fourier_encode(pos, 5.0, 3).flatten(-2).expand(2, 5, 4, 14)], dim=-1).reshape(2, 20, -1)
    x = sd["latents"].expand(2, -1, -1)
    for i in range(depth):
        x = reference_attention(sd, f"layers.{i}.0.", x, features, 2, mask, inverted[i]) + x
        x = reference_ff(sd, f"layers.{i}.1.", x) + x
        for j in range(per_cross):
            x = reference_attention(sd, f"layers.{i}.2.{j}.0.", x, None, 2) + x
            x = reference_ff(sd, f"layers.{i}.2.{j}.1.", x) + x
    expected = F.layer_norm(x.mean(dim=1), (latent_dim,)) @ sd["to_logits.2.weight"].T + sd["to_logits.2.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(img, mask=mask.reshape(2, 5, 4)), expected, atol=1e-5, rtol=1e-5)


def test_perceiver_lm_matches_written_out_forward():
    dim, latent_dim, depth = 12, 16, 2
    sd = {"token_emb.weight": torch.randn(50, dim), "pos_emb.weight": torch.randn(16, dim)}
    sd["perceiver_io.latents"] = torch.randn(8, latent_dim)
    sd.update(original_attention_params("perceiver_io.cross_attend_blocks.0.", latent_dim, dim, 1, 8, True))
    sd.update(original_ff_params("perceiver_io.cross_attend_blocks.1.", latent_dim))
    for j in range(depth):
        sd.update(original_attention_params(f"perceiver_io.layers.{j}.0.", latent_dim, latent_dim, 2, 8, False))
        sd.update(original_ff_params(f"perceiver_io.layers.{j}.1.", latent_dim))
    sd.update(original_attention_params("perceiver_io.decoder_cross_attn.", dim, latent_dim, 1, 8, True))
    sd.update(original_ff_params("perceiver_io.decoder_ff.", dim))
    sd.update({"perceiver_io.to_logits.weight": torch.randn(50, dim), "perceiver_io.to_logits.bias": torch.randn(50)})
    model = PerceiverLM(**TINY_LM, decoder_ff=True).eval()
    load_original_state_dict(model, sd)

    tokens = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    emb = sd["token_emb.weight"][tokens] + sd["pos_emb.weight"][:11]
    x = sd["perceiver_io.latents"].expand(2, -1, -1)
    x = reference_attention(sd, "perceiver_io.cross_attend_blocks.0.", x, emb, 1, mask) + x
    x = reference_ff(sd, "perceiver_io.cross_attend_blocks.1.", x) + x
    for j in range(depth):
        x = reference_attention(sd, f"perceiver_io.layers.{j}.0.", x, None, 2) + x
        x = reference_ff(sd, f"perceiver_io.layers.{j}.1.", x) + x
    decoded = reference_attention(sd, "perceiver_io.decoder_cross_attn.", emb, x, 1)  # no query residual
    decoded = decoded + reference_ff(sd, "perceiver_io.decoder_ff.", decoded)
    expected = decoded @ sd["perceiver_io.to_logits.weight"].T + sd["perceiver_io.to_logits.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_load_original_state_dict_names_unknown_keys():
    model = Perceiver(**TINY)
    with pytest.raises(KeyError, match="layers.0.9.weight"):
        load_original_state_dict(model, {"layers.0.9.weight": torch.zeros(1)})
