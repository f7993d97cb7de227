"""krasserm's early model API (`perceiver_hf.perceiver`, mirroring `perceiver.model` / `perceiver.adapter` of
perceiver-io commit 1e7069c), run as his users ran it: the README snippet with only the import prefix changed,
his parameter counts, his mask convention (True = padding), plain-tensor results that chain, activation
checkpointing, masking for the masked LM, and his trained weights loading with the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceiver_hf import modeling_perceiver
from perceiver_hf.perceiver.adapter import (
    ClassificationOutputAdapter,
    TextInputAdapter,
    TextOutputAdapter,
)
from perceiver_hf.perceiver.model import (
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverMLM,
    TextMasking,
    convert_original_state_dict,
)

# krasserm's README "Model API" snippet, with `perceiver.` -> `perceiver_hf.perceiver.` and nothing else changed.
README_SNIPPET = """
from perceiver_hf.perceiver.adapter import ImageInputAdapter, ClassificationOutputAdapter
from perceiver_hf.perceiver.model import PerceiverIO, PerceiverEncoder, PerceiverDecoder

latent_shape = (32, 128)

# Fourier-encode pixel positions and flatten along spatial dimensions
input_adapter = ImageInputAdapter(image_shape=(28, 28, 1), num_frequency_bands=32)

# Project generic Perceiver decoder output to specified number of classes
output_adapter = ClassificationOutputAdapter(num_classes=10, num_output_channels=128)

# Generic Perceiver encoder
encoder = PerceiverEncoder(
    input_adapter=input_adapter,
    latent_shape=latent_shape,
    num_layers=3,
    num_cross_attention_heads=4,
    num_self_attention_heads=4,
    num_self_attention_layers_per_block=3,
    dropout=0.0)

# Generic Perceiver decoder
decoder = PerceiverDecoder(
    output_adapter=output_adapter,
    latent_shape=latent_shape,
    num_cross_attention_heads=1,
    dropout=0.0)

# MNIST classifier implemented as Perceiver IO model
mnist_classifier = PerceiverIO(encoder, decoder)
"""


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def text_model(num_layers: int = 2, vocab_size: int = 50, max_seq_len: int = 12, channels: int = 16):
    torch.manual_seed(0)
    encoder = PerceiverEncoder(
        TextInputAdapter(vocab_size, max_seq_len, channels),
        latent_shape=(6, channels),
        num_layers=num_layers,
        num_self_attention_layers_per_block=2,
    )
    decoder = PerceiverDecoder(ClassificationOutputAdapter(3, num_output_channels=channels), latent_shape=(6, channels))
    return PerceiverIO(encoder, decoder).eval()


def test_readme_snippet_runs_as_written_and_learns() -> None:
    namespace: dict = {}
    exec(README_SNIPPET, namespace)
    model, encoder, decoder = namespace["mnist_classifier"], namespace["encoder"], namespace["decoder"]
    # krasserm's own code builds this model with 904,086 parameters (measured with perceiver-io at 1e7069c).
    assert num_parameters(model) == 904_086
    images = torch.rand(4, 28, 28, 1)
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 10)
    latents = encoder(images)  # plain tensors: the encoder's latents feed the decoder directly
    assert isinstance(latents, torch.Tensor) and latents.shape == (4, 32, 128)
    torch.testing.assert_close(decoder(latents), logits)
    assert model.encoder is encoder and model.decoder is decoder

    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_parameter_counts_equal_the_originals() -> None:
    """The masked LM and text classifier of krasserm's training scripts (scripts/mlm.py, scripts/seq_clf.py
    defaults); his code gives 1,738,643 and 1,055,874 parameters."""
    vocab_size, max_seq_len, latents, channels = 10003, 512, 64, 64

    def encoder() -> PerceiverEncoder:
        adapter = TextInputAdapter(vocab_size=vocab_size, max_seq_len=max_seq_len, num_input_channels=channels)
        return PerceiverEncoder(adapter, (latents, channels), num_layers=3, num_self_attention_layers_per_block=6)

    mlm_decoder = PerceiverDecoder(TextOutputAdapter(vocab_size, max_seq_len, channels), (latents, channels))
    mlm = PerceiverMLM(encoder(), mlm_decoder, TextMasking(vocab_size))
    assert num_parameters(mlm) == 1_738_643
    classifier_decoder = PerceiverDecoder(
        ClassificationOutputAdapter(2, num_output_channels=channels), (latents, channels), num_cross_attention_heads=1
    )
    assert num_parameters(PerceiverIO(encoder(), classifier_decoder)) == 1_055_874


def test_pad_mask_true_marks_padding() -> None:
    """krasserm's `pad_mask` is a key padding mask: True at padding. Every row of this batch has padding; what
    sits there must not matter, and the real tokens must."""
    model = text_model()
    x = torch.randint(3, 50, (2, 8))
    pad_mask = torch.zeros(2, 8, dtype=torch.bool)
    pad_mask[0, 6:] = True
    pad_mask[1, 3:] = True
    reference = model(x, pad_mask)
    other_padding = x.clone()
    other_padding[pad_mask] = 0
    torch.testing.assert_close(model(other_padding, pad_mask), reference, atol=1e-5, rtol=0)
    other_tokens = x.clone()
    other_tokens[~pad_mask] = (x[~pad_mask] + 1) % 50
    assert not torch.allclose(model(other_tokens, pad_mask), reference, atol=1e-3)
    # The same as the rows alone, without padding.
    torch.testing.assert_close(model(x[1:, :3]), reference[1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pad_mask must be a boolean tensor, True for padding"):
        model(x, (~pad_mask).long())


def test_weight_sharing_of_num_layers() -> None:
    """Layer 1 has its own weights, layers 2.. share one set: a third layer adds no parameters."""
    one, two, three = (num_parameters(text_model(n).encoder) for n in (1, 2, 3))
    assert three == two > one


def test_activation_checkpoint_gives_the_same_gradients() -> None:
    x = torch.randint(3, 50, (2, 8))
    grads = []
    for activation_checkpoint in (False, True):
        torch.manual_seed(0)
        encoder = PerceiverEncoder(TextInputAdapter(50, 12, 16), (6, 16), num_layers=2,
                                   activation_checkpoint=activation_checkpoint)  # fmt: skip
        decoder = PerceiverDecoder(ClassificationOutputAdapter(3, num_output_channels=16), (6, 16),
                                   activation_checkpoint=activation_checkpoint)  # fmt: skip
        model = PerceiverIO(encoder, decoder).train()
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_decoder_rejects_latents_of_another_shape() -> None:
    decoder = PerceiverDecoder(ClassificationOutputAdapter(3, num_output_channels=16), latent_shape=(6, 16))
    with pytest.raises(ValueError, match=r"Latent shape \(5, 16\) different from required shape \(6, 16\)"):
        decoder(torch.randn(2, 5, 16))


def test_text_output_adapter_defaults_to_vocabulary_width_queries() -> None:
    adapter = TextOutputAdapter(vocab_size=20, max_seq_len=7)
    assert adapter.output_shape == (7, 20)
    assert adapter(torch.randn(2, 7, 20)).shape == (2, 7, 20)


def test_masked_lm_and_text_masking() -> None:
    torch.manual_seed(0)
    vocab_size = 40
    encoder = PerceiverEncoder(TextInputAdapter(vocab_size, 30, 16), (6, 16), num_layers=2)
    decoder = PerceiverDecoder(TextOutputAdapter(vocab_size, 30, 16), (6, 16))
    mlm = PerceiverMLM(encoder, decoder, TextMasking(vocab_size, mask_p=0.5))
    x = torch.randint(3, vocab_size, (4, 20))
    pad_mask = torch.zeros(4, 20, dtype=torch.bool)
    pad_mask[:, 15:] = True
    x[pad_mask] = 0
    original = x.clone()
    logits, labels = mlm(x, pad_mask)
    assert logits.shape == (4, 20, vocab_size) and labels.shape == (4, 20)
    selected = labels != -100
    assert selected.any() and not selected[pad_mask].any()  # padding is never selected
    assert torch.equal(labels[selected], original[selected])  # labels are the original tokens
    assert (x[selected] == 2).float().mean() > 0.6  # most selected tokens became [MASK] (id 2), in place
    assert torch.equal(x[~selected], original[~selected])
    loss = F.cross_entropy(logits.transpose(1, 2), labels)
    loss.backward()
    assert all(p.grad is not None for p in mlm.parameters())
    logits_only, no_labels = mlm(original.clone(), pad_mask, masking=False)
    assert no_labels is None and logits_only.shape == (4, 20, vocab_size)


def test_blocks_are_the_cores() -> None:
    """The mirror is the core's encoder and decoder, configured: one implementation of every layer."""
    model = text_model()
    assert isinstance(model.encoder, modeling_perceiver.PerceiverEncoder)
    assert isinstance(model.decoder, modeling_perceiver.PerceiverDecoder)
    assert model.encoder.config.qkv_bias and model.encoder.config.num_cross_attention_heads == 4
    assert model.encoder.config.input_adapter == "none"  # his adapter is a module of its own, not a config name


def test_original_weights_load_and_compute_the_same_attention() -> None:
    """krasserm's layers were `nn.MultiheadAttention` (packed query/key/value projections, `key_padding_mask` True
    at padding). A layer's weights converted with `convert_original_state_dict` give torch's own result."""
    torch.manual_seed(0)
    model = text_model(num_layers=1)
    reference = nn.MultiheadAttention(16, num_heads=4, batch_first=True).eval()
    prefix = "0.layer_1.1.0.0.module.attention.attention."
    original = {prefix + name: tensor for name, tensor in reference.state_dict().items()}
    converted = convert_original_state_dict(original)
    layer = model.encoder.self_attention["0_0"]
    layer.attention.load_state_dict(
        {key.split("self_attention.0_0.attention.")[1]: value for key, value in converted.items()}
    )
    x = torch.randn(2, 5, 16)
    pad_mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    expected = reference(x, x, x, key_padding_mask=pad_mask, need_weights=False)[0]
    got = layer.attention(x, x, attention_mask=~pad_mask)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
