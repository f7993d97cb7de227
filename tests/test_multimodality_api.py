"""The model API of lucidrains' perceiver-pytorch and of the multi-modality fork (fac2003): the README examples
run with only the import changed, the constructor arguments and inputs are the same, weight tying shares
modules and keys/values, and missing modalities work.

The README examples are copied as written. Where their inputs are too large for a unit test (the fork's
3 x (image 260x260x3, video 32x260x260x3, audio 44100x1) batch has 6.8 million input positions), the constructor
call is kept verbatim and the inputs are smaller; the full-size forward is a one-off memory measurement
reported in examples/README.md.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import Embedding

from perceiver_hf import (
    InputModality,
    InputModalityWithEmbedding,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
    Perceiver,
    PerceiverCrossAttentionLayer,
)


def count_key_value_projections(model: nn.Module) -> list[int]:
    """A list whose length becomes the number of `project_kv` calls of the model's cross-attention layers."""
    calls: list[int] = []
    for module in model.modules():
        if isinstance(module, PerceiverCrossAttentionLayer):
            original = module.project_kv

            def counting(x, _original=original):
                calls.append(1)
                return _original(x)

            module.project_kv = counting
    return calls


# ---------------------------------------------------------------------------------------------------
# The README examples
# ---------------------------------------------------------------------------------------------------


def test_lucidrains_readme_perceiver_example() -> None:
    model = Perceiver(
        input_channels=3,  # number of channels for each token of the input
        input_axis=2,  # number of axis for input data (2 for images, 3 for video)
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=10.0,  # maximum frequency, hyperparameter depending on how fine the data is
        depth=6,  # depth of net
        num_latents=256,  # number of latents, or induced set points, or centroids. different papers giving it different names  # noqa: E501
        latent_dim=512,  # latent dimension
        cross_heads=1,  # number of heads for cross attention. paper said 1
        latent_heads=8,  # number of heads for latent self attention, 8
        cross_dim_head=64,
        latent_dim_head=64,
        num_classes=1000,  # output number of classes
        attn_dropout=0.0,
        ff_dropout=0.0,
        weight_tie_layers=False,  # whether to weight tie layers (optional, as indicated in the diagram)
    )

    img = torch.randn(1, 224, 224, 3)  # 1 imagenet image, pixelized

    with torch.no_grad():
        assert model(img).shape == (1, 1000)  # model(img) # (1, 1000)


def test_multimodality_readme_example_constructor_with_smaller_inputs() -> None:
    """The fork's README example (constructor verbatim, `depth=8`, `num_latent_blocks_per_layer=6`); inputs
    3 x (image 26x26x3, video 4x26x26x3, audio 441x1) instead of 260x260 / 32 frames / 44100 samples."""
    image_inputs = torch.rand(size=(3, 26, 26, 3), requires_grad=True)
    video_inputs = torch.rand(size=(3, 4, 26, 26, 3), requires_grad=True)
    audio_inputs = torch.rand(size=(3, 441, 1), requires_grad=True)

    video_modality = InputModality(
        name="video",
        input_channels=3,  # number of channels for each token of the input
        input_axis=3,  # number of axes, 3 for video)
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=4.0,  # maximum frequency, hyperparameter depending on how fine the data is
    )
    image_modality = InputModality(
        name="image",
        input_channels=3,  # number of channels for each token of the input
        input_axis=2,  # number of axes, 2 for images
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=4.0,  # maximum frequency, hyperparameter depending on how fine the data is
    )
    audio_modality = InputModality(
        name="audio",
        input_channels=1,  # number of channels for mono audio
        input_axis=1,  # number of axes, 2 for images
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=8.0,  # maximum frequency, hyperparameter depending on how fine the data is
    )
    model = MultiModalityPerceiver(
        modalities=(video_modality, image_modality, audio_modality),
        depth=8,  # depth of net, combined with num_latent_blocks_per_layer to produce full Perceiver
        num_latents=12,
        # number of latents, or induced set points, or centroids. different papers giving it different names
        latent_dim=64,  # latent dimension
        cross_heads=1,  # number of heads for cross attention. paper said 1
        latent_heads=8,  # number of heads for latent self attention, 8
        cross_dim_head=64,
        latent_dim_head=64,
        num_classes=1000,  # output number of classes
        attn_dropout=0.0,
        ff_dropout=0.0,
        weight_tie_layers=True,
        num_latent_blocks_per_layer=6,  # Note that this parameter is 1 in the original Lucidrain implementation
        # whether to weight tie layers (optional, as indicated in the diagram)
    )
    result = model({"image": image_inputs, "video": video_inputs, "audio": audio_inputs})
    assert result.shape == (3, 1000)
    result.sum().backward()  # gradients reach every input, as requires_grad=True asks
    for inputs in (image_inputs, video_inputs, audio_inputs):
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0


def test_lucidrains_readme_multimodality_example_with_cross_dim() -> None:
    """lucidrains' README version of the same example passes `cross_dim=64` and `depth=6` (constructor as
    written, smaller inputs)."""
    video_modality = InputModality(name="video", input_channels=3, input_axis=3, num_freq_bands=6, max_freq=4.0)
    image_modality = InputModality(name="image", input_channels=3, input_axis=2, num_freq_bands=6, max_freq=4.0)
    audio_modality = InputModality(name="audio", input_channels=1, input_axis=1, num_freq_bands=6, max_freq=8.0)
    model = MultiModalityPerceiver(
        modalities=(video_modality, image_modality, audio_modality),
        depth=6,  # depth of net
        num_latents=12,
        # number of latents, or induced set points, or centroids. different papers giving it different names
        cross_dim=64,  # cross attention dimension
        latent_dim=64,  # latent dimension
        cross_heads=1,  # number of heads for cross attention. paper said 1
        latent_heads=8,  # number of heads for latent self attention, 8
        cross_dim_head=64,
        latent_dim_head=64,
        num_classes=1000,  # output number of classes
        attn_dropout=0.0,
        ff_dropout=0.0,
        weight_tie_layers=True,
        # whether to weight tie layers (optional, as indicated in the diagram)
    )
    with torch.no_grad():
        result = model({'image': torch.rand(3, 20, 20, 3), 'video': torch.rand(3, 2, 20, 20, 3),
                        'audio': torch.rand(3, 300, 1)})  # fmt: skip
    assert result.shape == (3, 1000)


def test_multimodality_with_text_example() -> None:
    """The fork's text example (its test `test_multimodality_forward_image_text`): token ids (3, 512, 1), a
    32000 x 256 embedding split across 4 layers."""
    text_embedding_dim, depth, num_classes = 256, 4, 10
    image_inputs = torch.rand(3, 32, 32, 3)
    text_inputs = torch.randint(0, 32000, (3, 512, 1))
    image_modality = InputModalityWithEmbedding(
        name="image",
        input_channels=3,  # number of channels for each token of the input
        input_axis=2,  # number of axes, 2 for images
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=4.0,  # maximum frequency, hyperparameter depending on how fine the data is
    )
    text_modality = InputModalityWithEmbedding(
        name="text",
        input_channels=1,  # 1 channel for long ids representing tokens
        input_axis=1,  # number of axes, 2 for images
        num_freq_bands=6,  # number of freq bands, with original value (2 * K + 1)
        max_freq=8.0,  # maximum frequency, hyperparameter depending on how fine the data is
        embedding=Embedding(32000, text_embedding_dim),
    )
    model = MultiModalityWithTextPerceiver(
        modalities=(image_modality, text_modality),
        depth=depth,  # depth of net
        num_latent_blocks_per_layer=2,
        num_latents=12,
        # number of latents, or induced set points, or centroids. different papers giving it different names
        latent_dim=64,  # latent dimension
        cross_heads=1,  # number of heads for cross attention. paper said 1
        latent_heads=8,  # number of heads for latent self attention, 8
        cross_dim_head=64,
        latent_dim_head=64,
        num_classes=num_classes,  # output number of classes
        attn_dropout=0.0,
        ff_dropout=0.0,
        weight_tie_layers=True,
        # whether to weight tie layers (optional, as indicated in the diagram)
    )
    calls = count_key_value_projections(model)
    with torch.no_grad():
        result = model({"image": image_inputs, "text": text_inputs})
    assert result.shape == (3, num_classes)
    # Each layer sees its own slice of the text embedding, so no two layers share keys and values.
    assert len(calls) == depth
    # The fork's per-layer width: 256 / 4 embedding channels + 13 Fourier channels (image: 3 + 26 = 29).
    assert text_modality.embedding_dim(depth) == 64 + 13
    assert model.input_adapter.num_input_channels == 77
    # The embedding given in the modality is the one the model trains.
    assert model.input_adapter.token_embeddings["text"] is text_modality.embedding


# ---------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------


def small_modalities() -> tuple[InputModality, InputModality]:
    image = InputModality(name="image", input_channels=3, input_axis=2, num_freq_bands=3, max_freq=8.0)
    audio = InputModality(name="audio", input_channels=1, input_axis=1, num_freq_bands=3, max_freq=16.0)
    return image, audio


def small_model(**overrides) -> MultiModalityPerceiver:
    kwargs = dict(modalities=small_modalities(), depth=4, num_latents=6, latent_dim=16, latent_heads=2,
                  cross_dim_head=8, latent_dim_head=8, num_classes=5, weight_tie_layers=True)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    return MultiModalityPerceiver(**kwargs).eval()


@pytest.mark.parametrize(("weight_tie_layers", "distinct_layers", "projections"), [(True, 2, 2), (False, 4, 4)])
def test_weight_tying_shares_layers_and_their_keys_and_values(
    weight_tie_layers: bool, distinct_layers: int, projections: int
) -> None:
    model = small_model(weight_tie_layers=weight_tie_layers)
    assert len(model.layers.cross_attention_layers) == distinct_layers
    assert len(model.layers.self_attention_blocks) == distinct_layers
    calls = count_key_value_projections(model)
    with torch.no_grad():
        model({"image": torch.rand(2, 6, 5, 3), "audio": torch.rand(2, 30, 1)})
    # Tied: layer 1 and the shared layers 2..4 each project the inputs once (not once per layer).
    assert len(calls) == projections


def test_weight_tying_keeps_the_parameter_count_independent_of_depth() -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(small_model(depth=3)) == count(small_model(depth=8))
    assert count(small_model(depth=3, weight_tie_layers=False)) < count(small_model(depth=8, weight_tie_layers=False))


def test_missing_modalities_and_masks() -> None:
    model = small_model()
    image, audio = torch.rand(2, 6, 5, 3), torch.rand(2, 30, 1)
    with torch.no_grad():
        audio_only = model({"audio": audio})
        # The image masked out for example 1 (a dict of per-modality masks)...
        masked = model({"image": image, "audio": audio}, mask={"image": torch.tensor([True, False])})
        # ...or as the fork's joint mask over the concatenated inputs, modalities sorted by name (audio, image).
        joint = torch.ones(2, 30 + 30, dtype=torch.bool)
        joint[1, 30:] = False
        masked_joint = model({"image": image, "audio": audio}, mask=joint)
    torch.testing.assert_close(masked[1], audio_only[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_joint, masked, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, positions\) = \(2, 60\)"):
        model({"image": image, "audio": audio}, mask=joint[:, :40])


def test_no_pooling_returns_latents_and_pool_can_be_overridden() -> None:
    image, audio = small_modalities()
    model = MultiModalityPerceiverNoPooling(modalities=(image, audio), depth=2, num_latents=6, latent_dim=16,
                                            latent_heads=2, latent_dim_head=8, cross_dim_head=8)  # fmt: skip
    latents = model({"audio": torch.rand(3, 20, 1)})
    assert latents.shape == (3, 6, 16)
    # GELU by default in the fork's no-pooling class, GEGLU (a doubled first layer) in MultiModalityPerceiver.
    gelu_fc1 = model.layers.cross_attention_layers[0].mlp.fc1
    geglu_fc1 = small_model(latent_dim=16).layers.cross_attention_layers[0].mlp.fc1
    assert geglu_fc1.out_features == 2 * gelu_fc1.out_features == 2 * 4 * 16

    class MaxPooling(MultiModalityPerceiver):
        def pool(self, x: torch.Tensor) -> torch.Tensor:
            return x.max(dim=-2).values

    torch.manual_seed(0)
    mean_model = small_model()
    torch.manual_seed(0)
    max_model = MaxPooling(
        modalities=small_modalities(), depth=4, num_latents=6, latent_dim=16, latent_heads=2, cross_dim_head=8,
        latent_dim_head=8, num_classes=5, weight_tie_layers=True,
    ).eval()  # fmt: skip
    inputs = {"audio": torch.rand(2, 20, 1)}
    with torch.no_grad():
        assert not torch.allclose(max_model(inputs), mean_model(inputs))


def test_perceiver_options_of_the_current_lucidrains_release() -> None:
    torch.manual_seed(0)
    kwargs = dict(input_channels=2, input_axis=1, num_freq_bands=4, max_freq=10.0, depth=2, num_latents=4,
                  latent_dim=16, latent_heads=2, latent_dim_head=8, cross_dim_head=8, num_classes=3)  # fmt: skip
    data = torch.rand(2, 25, 2)
    model = Perceiver(**kwargs, self_per_cross_attn=2).eval()
    assert len(model.layers.self_attention_blocks[0]) == 2
    assert model(data).shape == (2, 3)
    assert model(data, return_embeddings=True).shape == (2, 4, 16)
    assert Perceiver(**kwargs, final_classifier_head=False)(data).shape == (2, 4, 16)
    no_fourier = Perceiver(**kwargs, fourier_encode_data=False)
    assert no_fourier.input_adapter.num_input_channels == 2
    assert model.input_adapter.num_input_channels == 2 + 1 * (2 * 4 + 1)
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 10:] = False
    other = data.clone()
    other[1, 10:] = torch.rand(15, 2)  # masked-out positions: their values must not matter
    with torch.no_grad():
        torch.testing.assert_close(model(other, mask=mask), model(data, mask=mask), atol=1e-5, rtol=0)
        assert not torch.allclose(model(other)[1], model(data)[1], atol=1e-4)


def test_clear_errors_for_bad_inputs() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"modality 'image' has 2 axes and 3 channels"):
        model({"image": torch.rand(2, 6, 3)})
    with pytest.raises(ValueError, match=r"unknown modalities \['video'\]"):
        model({"video": torch.rand(2, 2, 6, 5, 3)})
    with pytest.raises(ValueError, match="non-empty sequence of InputModality"):
        MultiModalityPerceiver(modalities=(), depth=2)
    with pytest.raises(ValueError, match=r"depth \(0\)"):
        Perceiver(num_freq_bands=2, depth=0, max_freq=4.0)
