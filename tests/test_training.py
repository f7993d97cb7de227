"""Training behaviour: a short masked-LM run on the shipped IMDb sample learns, and activation
(gradient) checkpointing changes memory use only, never the loss or the gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from perceiver_tester import HEAD_SPECS, HeadSpec, spec_ids, tiny_text_config
from transformers import DataCollatorForLanguageModeling

from perceiver_hf import PerceiverForMaskedLM, PerceiverForSequenceClassification


def test_short_masked_lm_run_reduces_the_loss(wordpiece_tokenizer, imdb_texts: list[str]) -> None:
    """A tiny MLM trained for 40 AdamW steps on one fixed batch of IMDb reviews: the loss must fall well
    below its starting value (about ln(vocab_size) for an untrained model).

    Measured: 6.2 -> 4.1, the entropy of the masked tokens' own frequencies; going below that (using the
    context) takes a few hundred steps, which the classifier test below checks far more cheaply.
    """
    tokenizer = wordpiece_tokenizer
    torch.manual_seed(0)
    config = tiny_text_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=32,
        d_model=32,
        d_latents=32,
        num_latents=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = PerceiverForMaskedLM(config).train()
    encodings = tokenizer(imdb_texts[:16], truncation=True, max_length=32)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    batch = collator([{"input_ids": ids} for ids in encodings["input_ids"]])
    assert (batch["labels"] != -100).any()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * torch.log(torch.tensor(float(len(tokenizer)))).item()  # started untrained
    assert losses[-1] < 0.75 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_short_classifier_run_fits_its_batch(wordpiece_tokenizer, imdb_train: dict[str, list]) -> None:
    """A tiny sentiment classifier fits 16 padded IMDb reviews (8 per class) in 40 AdamW steps: the model
    reads its inputs through the padding mask, and gradients reach the whole network."""
    examples = list(zip(imdb_train["text"], imdb_train["label"], strict=True))
    negatives = [text for text, label in examples if label == 0][:8]
    positives = [text for text, label in examples if label == 1][:8]
    batch = wordpiece_tokenizer(
        negatives + positives, truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    labels = torch.tensor([0] * 8 + [1] * 8)
    torch.manual_seed(0)
    config = tiny_text_config(
        vocab_size=len(wordpiece_tokenizer),
        max_position_embeddings=32,
        d_model=32,
        d_latents=32,
        num_latents=8,
        num_labels=2,
        pad_token_id=wordpiece_tokenizer.pad_token_id,
    )
    model = PerceiverForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits.argmax(-1), labels)


def losses_and_gradients(model: torch.nn.Module, spec: HeadSpec, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = spec.scalar_loss(model(**inputs))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(spec: HeadSpec, enable: str) -> None:
    # Dropout is off (the tiny config's default), so both runs compute the same function.
    model = spec.build(num_self_attention_blocks=2, num_cross_attention_layers=2).train()
    inputs = spec.inputs(model.config, [9, 5])
    labels = spec.labels(model.config, inputs)
    if labels is not None:
        inputs["labels"] = labels
    expected_loss, expected_grads = losses_and_gradients(model, spec, inputs)

    with warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing_enable; the old name warns but must still work.
        warnings.simplefilter("ignore", FutureWarning)
        getattr(model, enable)()
    # Count the layers that actually run under checkpointing, so a no-op "enable" fails the test.
    checkpointed = [0]
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            original = module._gradient_checkpointing_func

            def counting(*args, _original=original, **kwargs):
                checkpointed[0] += 1
                return _original(*args, **kwargs)

            module._gradient_checkpointing_func = counting
    loss, grads = losses_and_gradients(model, spec, inputs)
    assert checkpointed[0] >= 3, "no layer ran under checkpointing"

    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)
