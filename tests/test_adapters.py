"""The per-modality pieces shared by the single-modality adapters and the multimodal adapter."""

from __future__ import annotations

import pytest
import torch

from perceiver_hf.adapters import ImageInputAdapter, concat_positions, move_channels_last
from perceiver_hf.adapters_audio import AudioInputAdapter, patch_features, patch_mask
from perceiver_hf.adapters_multimodal import (
    MODALITY_FEATURES,
    ModalityFeatures,
    ModalitySpec,
    MultimodalInputAdapter,
    TokenModalityFeatures,
)
from perceiver_hf.position_encoding import FourierPositionEncoding


def test_fixed_length_positions_are_the_first_positions_of_the_fixed_grid() -> None:
    fixed = FourierPositionEncoding(1, 3, (6.0,), fixed_length=6)
    spanning = FourierPositionEncoding(1, 3, (6.0,))
    full = spanning((6,), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(fixed((4,), torch.device("cpu"), torch.float32), full[:4], rtol=0, atol=0)
    assert not torch.equal(spanning((4,), torch.device("cpu"), torch.float32), full[:4])
    with pytest.raises(ValueError, match="fixed_length applies to 1 spatial axis"):
        FourierPositionEncoding(2, 3, fixed_length=6)


def test_move_channels_last_and_concat_positions() -> None:
    x = torch.randn(2, 3, 5, 4)
    assert move_channels_last(x, 4) is x
    torch.testing.assert_close(move_channels_last(x, 3), x.permute(0, 2, 3, 1))
    assert move_channels_last(x, 7) is None
    positions = torch.randn(6, 2)
    out = concat_positions(torch.randn(3, 6, 5), positions)
    assert out.shape == (3, 6, 7)
    torch.testing.assert_close(out[1, :, 5:], positions)


@pytest.mark.parametrize("spectrogram", [False, True])
def test_patch_features_zero_padding_and_mask(spectrogram: bool) -> None:
    x = torch.randn(2, 10, 3)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    patches, patch_level = patch_features(x, 4, mask, spectrogram)
    assert patches.shape == (2, 3, 3 * (3 if spectrogram else 4))
    assert torch.equal(patch_level, patch_mask(mask, 4))
    # Padded samples never matter: the same patches whatever values they hold.
    noisy = x.clone()
    noisy[1, 6:] = 100.0
    torch.testing.assert_close(patch_features(noisy, 4, mask, spectrogram)[0], patches, rtol=0, atol=0)
    assert patch_features(x, 4, None, spectrogram)[1] is None


@pytest.mark.parametrize("spectrogram", [False, True])
def test_multimodal_audio_modality_equals_the_audio_adapter(spectrogram: bool) -> None:
    """With the same settings, the multimodal adapter's audio features are the audio adapter's (one implementation)."""
    audio = AudioInputAdapter(
        max_samples=30, patch_size=4, num_frequency_bands=5, preprocessing="spectrogram" if spectrogram else "samples"
    )
    spec = {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": 5, "max_freq": 8.0}
    spec |= {"max_length": 30, "patch_size": 4, "spectrogram": spectrogram}
    multimodal = MultimodalInputAdapter([spec], use_modality_embedding=False)
    waveform, mask = torch.randn(2, 22), torch.ones(2, 22)
    mask[0, 13:] = 0
    expected, expected_mask = audio(waveform, mask)
    x, joint = multimodal({"audio": waveform}, {"audio": mask})
    assert multimodal.num_input_channels == audio.num_input_channels
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert torch.equal(joint, expected_mask)


def test_multimodal_image_modality_equals_the_image_adapter() -> None:
    image = ImageInputAdapter((6, 5, 3), num_frequency_bands=4, max_frequencies=(7.0, 7.0))
    spec = {"name": "image", "channels": 3, "num_axes": 2, "num_freq_bands": 4, "max_freq": 7.0}
    multimodal = MultimodalInputAdapter([spec], use_modality_embedding=False)
    pixels = torch.randn(2, 3, 6, 5)  # channels-first, as image processors return
    x, mask = multimodal({"image": pixels})
    torch.testing.assert_close(x, image(pixels), rtol=0, atol=0)
    assert mask is None


def test_feature_modules_add_no_state_dict_entries() -> None:
    specs = [
        {"name": "image", "channels": 3, "num_axes": 2, "num_freq_bands": 4, "max_freq": 7.0},
        {"name": "text", "channels": 8, "num_axes": 1, "num_freq_bands": 2, "max_freq": 16.0, "vocab_size": 30},
    ]
    adapter = MultimodalInputAdapter(specs)
    assert isinstance(adapter.features["image"], ModalityFeatures)
    assert isinstance(adapter.features["text"], TokenModalityFeatures)
    assert {s.kind for s in map(ModalitySpec.from_dict, specs)} == set(MODALITY_FEATURES)
    assert sorted(adapter.state_dict()) == [
        "modality_embedding.image.weight",
        "modality_embedding.text.weight",
        "token_embeddings.text.weight",
    ]
