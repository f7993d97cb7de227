"""`perceiver_hf.perceiver_multi_modality_pytorch`, the mirror of the multi-modality fork of perceiver-pytorch
(perceiver-multi-modality-pytorch 1.3.0, fac2003/perceiver-multi-modality-pytorch commit 9d5e356).

What the fork's own tests check (modality encoding shape, text embedding slices, forward passes of image + video +
audio and image + text, every parameter changing after an optimizer step), on tiny inputs, plus: the README
examples (their parameter counts; the README model on small inputs); the original's parameter counts for tiny
configurations; the fork's weight tying; masks honoured; and outputs equal to a forward pass written out here from
the fork's code (input construction, extra block residual, pooling), on weights in the original's state-dict
layout loaded with `load_original_state_dict`.

Parameter counts (`ORIGINAL_COUNTS` and the README / fork-test counts) were measured with the original code
(commit 9d5e3565, `sum(p.numel() for p in model.parameters())`) for the same arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mirror_reference import reference_attention
from torch.nn import Embedding

from perceiver_hf.perceiver_multi_modality_pytorch import Perceiver, load_original_state_dict
from perceiver_hf.perceiver_multi_modality_pytorch.modalities import InputModalityWithEmbedding, modality_encoding
from perceiver_hf.perceiver_multi_modality_pytorch.multi_modality_perceiver import (
    InputModality,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
)
from perceiver_hf.perceiver_multi_modality_pytorch.multi_modality_with_text_perceiver import (
    MultiModalityWithTextPerceiver,
)
from perceiver_hf.perceiver_multi_modality_pytorch.perceiver_pytorch import fourier_encode

TINY = dict(num_latents=6, latent_dim=16, cross_heads=1, latent_heads=2, cross_dim_head=8, latent_dim_head=8)


def modalities():
    # The fork's test and README modalities.
    return (
        InputModality(name="video", input_channels=3, input_axis=3, num_freq_bands=6, max_freq=4.0),
        InputModality(name="image", input_channels=3, input_axis=2, num_freq_bands=6, max_freq=4.0),
        InputModality(name="audio", input_channels=1, input_axis=1, num_freq_bands=6, max_freq=8.0),
    )


def text_modalities(embedding_dim=32, vocab_size=100):
    return (
        InputModalityWithEmbedding(name="image", input_channels=3, input_axis=2, num_freq_bands=6, max_freq=4.0),
        InputModalityWithEmbedding(
            name="text", input_channels=1, input_axis=1, num_freq_bands=6, max_freq=8.0,
            embedding=Embedding(vocab_size, embedding_dim),
        ),
    )  # fmt: skip


def inputs(batch=2):
    return {
        "image": torch.rand(batch, 5, 4, 3),
        "video": torch.rand(batch, 2, 3, 4, 3),
        "audio": torch.rand(batch, 7, 1),
    }


def text_inputs(batch=2):
    return {"image": torch.rand(batch, 5, 4, 3), "text": torch.randint(0, 100, (batch, 9, 1))}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Measured with the original code (see the module docstring): (constructor, arguments, count).
ORIGINAL_COUNTS = [
    *[
        (MultiModalityPerceiver, dict(weight_tie_layers=tie, use_gelu=gelu, num_latent_blocks_per_layer=k), count)
        for (tie, gelu, k), count in {
            (False, False, 1): 26_259, (False, False, 3): 52_179, (False, True, 1): 19_731, (False, True, 3): 39_123,
            (True, False, 1): 21_897, (True, False, 3): 30_537, (True, True, 1): 16_457, (True, True, 3): 22_921,
        }.items()
    ],
    (MultiModalityPerceiverNoPooling, dict(weight_tie_layers=False, num_latent_blocks_per_layer=2), 29_310),
    (MultiModalityPerceiverNoPooling, dict(weight_tie_layers=True, num_latent_blocks_per_layer=2), 19_572),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------------------
# The fork's tests, README and parameter counts
# --------------------------------------------------------------------------------------------------------------


def test_modality_encoding():
    x = modality_encoding(batch_size=3, axes=(32, 12), modality_index=0, num_modalities=2)
    assert x.size() == (3, 32, 12, 2)
    assert torch.equal(x[1, 5, 7], torch.tensor([1.0, 0.0]))
    assert torch.equal(modality_encoding(2, (4,), 2, 3)[0, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_embedding_for_layer():
    text = text_modalities(embedding_dim=256)[1]
    tokens = torch.randint(0, 100, (3, 50, 1))
    embedded = text.maybe_embed(tokens)
    assert embedded.shape == (3, 50, 256)
    assert text.embedding_for_layer(embedded=embedded, layer_index=1, depth=4).shape == (3, 50, 64)
    torch.testing.assert_close(text.embedding_for_layer(embedded, 1, 4), embedded[..., 64:128])
    assert text.embedding_dim(4) == 64 + 13  # the slice, then one axis of Fourier features
    image = text_modalities()[0]
    assert image.embedding_dim(4) == image.input_dim == 2 * 13 + 3
    assert image.maybe_embed(tokens) is tokens


def test_multimodality_forward_image_video_audio():
    # The fork's test (depth=2, tied, 12 latents of 64) on small inputs; its parameter count from the original.
    model = MultiModalityPerceiver(
        modalities=modalities(), depth=2, num_latents=12, latent_dim=64, cross_heads=1, latent_heads=8,
        cross_dim_head=64, latent_dim_head=64, num_classes=32, attn_dropout=0.0, ff_dropout=0.0,
        weight_tie_layers=True,
    )  # fmt: skip
    assert num_params(model) == 493_396
    assert model(inputs(3)).shape == (3, 32)


def test_multimodality_forward_no_pooling():
    model = MultiModalityPerceiverNoPooling(
        modalities=modalities(), depth=2, num_latents=12, latent_dim=17, cross_heads=1, latent_heads=8,
        cross_dim_head=64, latent_dim_head=64, attn_dropout=0.0, ff_dropout=0.0, weight_tie_layers=True,
    )  # fmt: skip
    assert num_params(model) == 95_816
    assert model(inputs(3)).shape == (3, 12, 17)


def test_multimodality_forward_image_text():
    model = MultiModalityWithTextPerceiver(
        modalities=text_modalities(embedding_dim=256, vocab_size=32000), depth=2, num_latent_blocks_per_layer=2,
        num_latents=12,
        latent_dim=64, cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=64, num_classes=32,
        attn_dropout=0.0, ff_dropout=0.0, weight_tie_layers=True,
    )  # fmt: skip
    assert num_params(model) == 8_891_996
    assert model({"image": torch.rand(3, 5, 4, 3), "text": torch.randint(0, 32000, (3, 9, 1))}).shape == (3, 32)


def test_readme_examples():
    perceiver = Perceiver(
        input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=6, num_latents=256, latent_dim=512,
        cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=64, num_classes=1000, attn_dropout=0.0,
        ff_dropout=0.0, weight_tie_layers=False,
    )  # fmt: skip
    assert num_params(perceiver) == 45_187_140
    with torch.no_grad():
        assert perceiver(torch.randn(1, 16, 16, 3)).shape == (1, 1000)  # the README's image is 224 x 224

    model = MultiModalityPerceiver(
        modalities=modalities(), depth=8, num_latents=12, latent_dim=64, cross_heads=1, latent_heads=8,
        cross_dim_head=64, latent_dim_head=64, num_classes=1000, attn_dropout=0.0, ff_dropout=0.0,
        weight_tie_layers=True, num_latent_blocks_per_layer=6,
    )  # fmt: skip
    assert num_params(model) == 2_548_636
    # The README's inputs (3 x 32 x 260 x 260 video, ...) need tens of GB: the same model on small ones.
    video = torch.rand(3, 2, 8, 8, 3, requires_grad=True)
    audio = torch.rand(3, 441, 1, requires_grad=True)
    result = model({"image": torch.rand(3, 8, 8, 3), "video": video, "audio": audio})
    assert result.shape == (3, 1000)
    result.sum().backward()
    assert video.grad is not None and audio.grad is not None


@pytest.mark.parametrize(("cls", "kwargs", "expected"), ORIGINAL_COUNTS)
def test_parameter_count_matches_original(cls, kwargs, expected):
    extra = {} if cls is MultiModalityPerceiverNoPooling else {"num_classes": 5}
    assert num_params(cls(modalities=modalities(), depth=3, **TINY, **extra, **kwargs)) == expected


@pytest.mark.parametrize(("weight_tie_layers", "expected"), [(False, 28_913), (True, 24_593)])
def test_text_parameter_count_matches_original(weight_tie_layers, expected):
    model = MultiModalityWithTextPerceiver(
        modalities=text_modalities(), depth=2, **TINY, num_classes=5, weight_tie_layers=weight_tie_layers,
        num_latent_blocks_per_layer=2,
    )  # fmt: skip
    assert num_params(model) == expected


@pytest.mark.parametrize(("weight_tie_layers", "expected"), [(False, 24_997), (True, 16_747)])
def test_fork_perceiver_parameter_count_matches_original(weight_tie_layers, expected):
    model = Perceiver(
        input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=3, **TINY, num_classes=7,
        weight_tie_layers=weight_tie_layers,
    )  # fmt: skip
    assert num_params(model) == expected


def test_weight_tie_layers_ties_as_the_fork():
    # Tied: cross-attention layer 1 its own, 2.. shared; block 1 of every latent transformer its own weights,
    # block j >= 2 shared by all layers (cache_by_name_fn keyed by block index).
    tied = MultiModalityPerceiver(modalities=modalities(), depth=3, **TINY, num_classes=5, weight_tie_layers=True,
                                  num_latent_blocks_per_layer=3).encoder  # fmt: skip
    assert tied.cross_attention_keys == ["0", "1", "1"]
    assert tied.self_attention_keys == [["0_0", "0_1", "0_2"], ["1_0", "0_1", "0_2"], ["2_0", "0_1", "0_2"]]
    assert tied.self_attention_block_residual
    untied = MultiModalityPerceiver(modalities=modalities(), depth=2, **TINY, num_classes=5,
                                    num_latent_blocks_per_layer=2).encoder  # fmt: skip
    assert untied.self_attention_keys == [["0_0", "0_1"], ["1_0", "1_1"]]
    # The fork's plain Perceiver: one cache per layer type, so layers 2.. share everything.
    fork = Perceiver(num_freq_bands=4, depth=3, max_freq=10.0, **TINY, num_classes=7, weight_tie_layers=True).encoder
    assert fork.self_attention_keys == [["0_0"], ["1_0"], ["1_0"]]
    assert not fork.self_attention_block_residual


# --------------------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------------------


def test_fourier_encode_is_logspaced():
    # The fork's frequencies are base ** linspace(1, log_base(max_freq / 2)): from `base` to max_freq / 2.
    x = torch.tensor([0.5, -0.25])
    scales = torch.tensor([2.0, 2.0 ** (1 + (math.log2(5) - 1) / 2), 5.0])
    expected = torch.cat(
        [torch.sin(x[:, None] * scales * math.pi), torch.cos(x[:, None] * scales * math.pi), x[:, None]], -1
    )
    torch.testing.assert_close(fourier_encode(x, max_freq=10.0, num_bands=3, base=2), expected)


def test_use_gelu_and_dropout_placement():
    gelu = MultiModalityPerceiver(modalities=modalities(), depth=2, **TINY, num_classes=5, use_gelu=True)
    assert gelu.encoder.self_attention["0_0"].mlp.fc1.out_features == 4 * 16  # GELU: no gate half
    geglu = MultiModalityPerceiver(modalities=modalities(), depth=2, **TINY, num_classes=5, attn_dropout=0.1,
                                   ff_dropout=0.2)  # fmt: skip
    layer = geglu.encoder.self_attention["0_0"]
    assert layer.mlp.fc1.out_features == 8 * 16
    # The fork drops the attention output and the feed-forward's hidden units, not the feed-forward's output.
    assert layer.attention.config.attention_dropout == 0.0 and layer.dropout.p == 0.1 and layer.mlp.dropout.p == 0.0
    assert layer.mlp.hidden_dropout.p == 0.2


def test_subset_of_modalities_and_pool_override():
    model = MultiModalityPerceiver(modalities=modalities(), depth=2, **TINY, num_classes=5).eval()
    data = inputs()
    assert model({"image": data["image"], "audio": data["audio"]}).shape == (2, 5)

    class FirstLatent(MultiModalityPerceiver):
        def pool(self, x):
            return x[:, 0]

    custom = FirstLatent(modalities=modalities(), depth=2, **TINY, num_classes=5).eval()
    custom.load_state_dict(model.state_dict())
    latents = MultiModalityPerceiverNoPooling(modalities=modalities(), depth=2, **TINY, use_gelu=False).eval()
    latents.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("to_logits")})
    torch.testing.assert_close(custom(data), model.to_logits(latents(data)[:, 0]))


@pytest.mark.parametrize("weight_tie_layers", [False, True])
def test_mask_is_honoured(weight_tie_layers):
    model = MultiModalityPerceiver(
        modalities=modalities(), depth=2, **TINY, num_classes=5, weight_tie_layers=weight_tie_layers,
        num_latent_blocks_per_layer=2,
    ).eval()  # fmt: skip
    data = inputs()
    # Positions in sorted modality order: audio (7), image (20), video (24).
    mask = torch.ones(2, 7 + 20 + 24, dtype=torch.bool)
    mask[1, :7] = False
    changed = dict(data, audio=data["audio"].clone())
    changed["audio"][1] = torch.rand(7, 1)
    torch.testing.assert_close(model(changed, mask=mask), model(data, mask=mask))
    assert not torch.allclose(model(changed), model(data))


def _train_cases():
    yield MultiModalityPerceiver(modalities=modalities(), depth=2, **TINY, num_classes=5, weight_tie_layers=True,
                                 num_latent_blocks_per_layer=2), inputs()  # fmt: skip
    yield (
        MultiModalityPerceiverNoPooling(modalities=modalities(), depth=2, **TINY, num_latent_blocks_per_layer=2),
        inputs(),
    )
    yield MultiModalityWithTextPerceiver(modalities=text_modalities(), depth=2, **TINY, num_classes=5,
                                         num_latent_blocks_per_layer=2), text_inputs()  # fmt: skip
    yield Perceiver(num_freq_bands=4, depth=2, max_freq=10.0, **TINY, num_classes=5), torch.rand(2, 5, 4, 3)


@pytest.mark.parametrize("case", range(4))
def test_every_parameter_is_trained(case):
    model, data = list(_train_cases())[case]
    model(data).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Against a forward pass written out from the fork's code, on weights in the original's layout
# --------------------------------------------------------------------------------------------------------------


def original_attention_params(prefix, query_dim, context_dim, inner, with_context):
    params = {
        f"{prefix}norm.weight": 1 + 0.1 * torch.randn(query_dim),
        f"{prefix}norm.bias": 0.1 * torch.randn(query_dim),
        f"{prefix}fn.to_q.weight": torch.randn(inner, query_dim) / query_dim**0.5,
        f"{prefix}fn.to_kv.weight": torch.randn(2 * inner, context_dim) / context_dim**0.5,
        # The fork's to_out is (Linear, Dropout).
        f"{prefix}fn.to_out.0.weight": torch.randn(query_dim, inner) / inner**0.5,
        f"{prefix}fn.to_out.0.bias": 0.1 * torch.randn(query_dim),
    }
    if with_context:
        params[f"{prefix}norm_context.weight"] = 1 + 0.1 * torch.randn(context_dim)
        params[f"{prefix}norm_context.bias"] = 0.1 * torch.randn(context_dim)
    return params


def original_ff_params(prefix, dim, gelu):
    hidden = 4 * dim
    return {
        f"{prefix}norm.weight": 1 + 0.1 * torch.randn(dim),
        f"{prefix}norm.bias": 0.1 * torch.randn(dim),
        f"{prefix}fn.net.0.weight": torch.randn(hidden if gelu else 2 * hidden, dim) / dim**0.5,
        f"{prefix}fn.net.0.bias": 0.1 * torch.randn(hidden if gelu else 2 * hidden),
        f"{prefix}fn.net.3.weight": torch.randn(dim, hidden) / hidden**0.5,  # (Linear, act, Dropout, Linear)
        f"{prefix}fn.net.3.bias": 0.1 * torch.randn(dim),
    }


def original_layers_params(depth, blocks, latent_dim, input_dim, inner, gelu):
    """An untied model's `latents` and `layers.*` in the fork's layout."""
    sd = {"latents": torch.randn(6, latent_dim)}
    for i in range(depth):
        sd.update(original_attention_params(f"layers.{i}.0.", latent_dim, input_dim, inner, with_context=True))
        sd.update(original_ff_params(f"layers.{i}.1.", latent_dim, gelu))
        for j in range(blocks):
            prefix = f"layers.{i}.2.latent_blocks.{j}."
            sd.update(original_attention_params(f"{prefix}0.", latent_dim, latent_dim, 2 * 8, with_context=False))
            sd.update(original_ff_params(f"{prefix}1.", latent_dim, gelu))
    return sd


def reference_ff(sd, prefix, x, gelu):
    x = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}norm.weight"], sd[f"{prefix}norm.bias"])
    h = x @ sd[f"{prefix}fn.net.0.weight"].T + sd[f"{prefix}fn.net.0.bias"]
    if gelu:
        h = F.gelu(h)
    else:
        h, gate = h.chunk(2, dim=-1)
        h = h * F.gelu(gate)
    return h @ sd[f"{prefix}fn.net.3.weight"].T + sd[f"{prefix}fn.net.3.bias"]


def reference_layers(sd, layer_inputs, blocks, gelu, mask=None):
    """The fork's `build_perceiver_layers` loop: cross-attention, feed-forward, then the latent transformer with
    its extra residual."""
    x = sd["latents"].expand(layer_inputs[0].shape[0], -1, -1)
    for i, data in enumerate(layer_inputs):
        x = reference_attention(sd, f"layers.{i}.0.", x, data, 1, mask, out_name="to_out.0") + x
        x = reference_ff(sd, f"layers.{i}.1.", x, gelu) + x
        y = x
        for j in range(blocks):
            prefix = f"layers.{i}.2.latent_blocks.{j}."
            y = reference_attention(sd, f"{prefix}0.", y, None, 2, out_name="to_out.0") + y
            y = reference_ff(sd, f"{prefix}1.", y, gelu) + y
        x = y + x
    return x


def reference_features(data, index, num_modalities, width, max_freq):
    """The fork's input of one modality (6 frequency bands): data, zero padding, Fourier features, one-hot;
    flattened."""
    b, *axes, channels = data.shape
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in axes], indexing="ij")
    features = [data, torch.zeros(b, *axes, width - channels - 13 * len(axes) - num_modalities)]
    for grid in grids:  # fourier_encode of the stacked positions, flattened: axis by axis
        features.append(fourier_encode(grid, max_freq, 6).expand(b, *axes, -1))
    features.append(F.one_hot(torch.tensor(index), num_modalities).float().expand(b, *axes, -1))
    return torch.cat(features, dim=-1).reshape(b, -1, width)


@pytest.mark.parametrize("use_gelu", [False, True])
def test_multimodality_matches_written_out_forward(use_gelu):
    depth, blocks, width = 2, 2, 3 * 13 + 3 + 3  # widest modality (video) plus one one-hot channel per modality
    sd = original_layers_params(depth, blocks, 16, width, 8, use_gelu)
    sd.update({"to_logits.0.weight": 1 + torch.randn(16), "to_logits.0.bias": torch.randn(16)})
    sd.update({"to_logits.1.weight": torch.randn(5, 16), "to_logits.1.bias": torch.randn(5)})
    model = MultiModalityPerceiver(modalities=modalities(), depth=depth, **TINY, num_classes=5,
                                   num_latent_blocks_per_layer=blocks, use_gelu=use_gelu).eval()  # fmt: skip
    load_original_state_dict(model, sd)

    data = inputs()
    mask = torch.ones(2, 51, dtype=torch.bool)
    mask[0, 30:] = False
    max_freq = {"image": 4.0, "video": 4.0, "audio": 8.0}
    features = torch.cat(
        [reference_features(data[name], i, 3, width, max_freq[name]) for i, name in enumerate(sorted(data))], dim=1
    )
    x = reference_layers(sd, [features] * depth, blocks, use_gelu, mask).mean(dim=1)
    expected = F.layer_norm(x, (16,), sd["to_logits.0.weight"], sd["to_logits.0.bias"])
    expected = expected @ sd["to_logits.1.weight"].T + sd["to_logits.1.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(data, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_text_perceiver_matches_written_out_forward():
    depth, blocks, embedding_dim = 2, 2, 32
    width = max(2 * 13 + 3, embedding_dim // depth + 13) + 2  # widest per-layer modality, then the one-hots
    sd = original_layers_params(depth, blocks, 16, width, 8, gelu=False)
    sd["embeddings.text.weight"] = torch.randn(100, embedding_dim)
    sd.update({"to_logits.0.weight": torch.ones(16), "to_logits.0.bias": torch.zeros(16)})
    sd.update({"to_logits.1.weight": torch.randn(5, 16), "to_logits.1.bias": torch.randn(5)})
    model = MultiModalityWithTextPerceiver(modalities=text_modalities(embedding_dim), depth=depth, **TINY,
                                           num_classes=5, num_latent_blocks_per_layer=blocks).eval()  # fmt: skip
    load_original_state_dict(model, sd)

    data = text_inputs()
    image = reference_features(data["image"], 0, 2, width, max_freq=4.0)
    embedded = sd["embeddings.text.weight"][data["text"][..., 0]]  # (B, 9, 32)
    layer_inputs = []
    for i in range(depth):  # layer i sees its 16-channel slice of the text embedding
        text_slice = embedded[..., i * 16 : (i + 1) * 16]
        text = reference_features(text_slice, 1, 2, width, max_freq=8.0)
        layer_inputs.append(torch.cat([image, text], dim=1))
    x = reference_layers(sd, layer_inputs, blocks, gelu=False).mean(dim=1)
    expected = F.layer_norm(x, (16,)) @ sd["to_logits.1.weight"].T + sd["to_logits.1.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(data), expected, atol=1e-5, rtol=1e-5)
