"""Perceiver AR (`PerceiverARForCausalLM`): the forward pass against an independent reference computation, the key/value
cache, batched generation with padding, Trainer, saving through the Auto classes, the text-generation pipeline, and
clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PerceiverTokenizer, pipeline

import perceiver_hf
from perceiver_hf import PerceiverARConfig, PerceiverARForCausalLM, PerceiverAttention, PerceiverConfig
from perceiver_hf.modeling_perceiver import apply_rotary_position_embeddings

VOCAB = 40


def tiny_config(**overrides) -> PerceiverARConfig:
    settings = dict(
        vocab_size=VOCAB,
        max_position_embeddings=48,
        num_latents=6,
        hidden_size=16,
        num_self_attention_layers=2,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        cross_attention_widening_factor=2,
        self_attention_widening_factor=2,
        prefix_dropout=0.5,
    )
    settings.update(overrides)
    return PerceiverARConfig(**settings)


def tiny_model(**overrides) -> PerceiverARForCausalLM:
    return PerceiverARForCausalLM(tiny_config(**overrides)).eval()


# --- an independent reference of the forward pass ----------------------------------------------------------------


def _ref_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of `x` `(H, n, d)` written out per channel pair (i, i + d/2)."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = positions.double() * theta ** (-2 * i / d)
        a, b = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = (a * angle.cos() - b * angle.sin()).to(x.dtype)
        out[..., i + d // 2] = (b * angle.cos() + a * angle.sin()).to(x.dtype)
    return out


def _ref_attention(attn, x_q, x_kv, q_pos, k_pos, theta):
    """Explicit causal softmax attention for one example: `x_q` `(nq, C)` at positions `q_pos`, `x_kv` `(nk, C)`."""
    h = attn.num_heads
    q = (x_q @ attn.q_proj.weight.T).view(len(x_q), h, -1).transpose(0, 1)
    k = (x_kv @ attn.k_proj.weight.T).view(len(x_kv), h, -1).transpose(0, 1)
    v = (x_kv @ attn.v_proj.weight.T).view(len(x_kv), h, -1).transpose(0, 1)
    q, k = _ref_rotate(q, q_pos, theta), _ref_rotate(k, k_pos, theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(x_q), -1)
    return out @ attn.o_proj.weight.T + attn.o_proj.bias


def _ref_mlp(mlp, x):
    hidden = F.gelu(
        F.linear(F.layer_norm(x, x.shape[-1:], mlp.norm.weight, mlp.norm.bias), mlp.fc1.weight, mlp.fc1.bias)
    )
    return F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)


def reference_logits_and_loss(model: PerceiverARForCausalLM, ids: torch.Tensor, c: int):
    """Perceiver AR written out for one unpadded example `ids` `(T,)` with `c` latents: returns `(c, V)` logits and
    the mean next-token cross-entropy of the first `c - 1` latents."""
    m, theta = model.model, model.config.rope_theta
    t = len(ids)
    x = m.embed_tokens.weight[ids]  # (T, D)
    pos = torch.arange(t)
    lat_pos = pos[t - c :]
    ca = m.cross_attention

    def ln(norm, y):
        return F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias)

    h = x[t - c :] + _ref_attention(ca.attention, ln(ca.q_norm, x[t - c :]), ln(ca.kv_norm, x), lat_pos, pos, theta)
    h = h + _ref_mlp(ca.mlp, h)
    for layer in m.self_attention:
        normed = ln(layer.norm, h)
        h = h + _ref_attention(layer.attention, normed, normed, lat_pos, lat_pos, theta)
        h = h + _ref_mlp(layer.mlp, h)
    logits = ln(m.norm, h) @ model.lm_head.weight.T
    loss = F.cross_entropy(logits[:-1], ids[t - c + 1 :])
    return logits, loss


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_and_loss_match_reference_computation(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    ids = torch.randint(0, VOCAB, (2, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 6, VOCAB)
    ref = [reference_logits_and_loss(model, row, 6) for row in ids]
    torch.testing.assert_close(out.logits, torch.stack([r[0] for r in ref]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, torch.stack([r[1] for r in ref]).mean(), atol=1e-5, rtol=1e-5)
    # Fewer latents: the same reference with c = 3.
    out3 = model(ids[:1], labels=ids[:1], num_latents=3)
    ref3 = reference_logits_and_loss(model, ids[0], 3)
    torch.testing.assert_close(out3.logits[0], ref3[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out3.loss, ref3[1], atol=1e-5, rtol=1e-5)


def test_predictions_are_causal_and_read_the_prefix():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 20))
    logits = model(ids).logits
    changed_last = ids.clone()
    changed_last[0, -1] = (ids[0, -1] + 1) % VOCAB
    # Changing the last token changes only the last latent's prediction.
    other = model(changed_last).logits
    torch.testing.assert_close(other[:, :-1], logits[:, :-1])
    assert not torch.allclose(other[:, -1], logits[:, -1])
    # The first prefix token (far from the latents) is read through the cross-attention.
    changed_first = ids.clone()
    changed_first[0, 0] = (ids[0, 0] + 1) % VOCAB
    assert not torch.allclose(model(changed_first).logits, logits)


def test_labels_ignore_index_and_loss_scope():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 12))
    labels = ids.clone()
    labels[:, :6] = -100  # the prefix and the first latent are never targets: the loss is unchanged
    torch.testing.assert_close(model(ids, labels=labels).loss, model(ids, labels=ids).loss)
    labels[:, -1] = -100  # the last target is dropped
    ref = F.cross_entropy(model(ids).logits[0, :-2], ids[0, -5:-1])
    torch.testing.assert_close(model(ids, labels=labels).loss, ref)


# --- key/value cache and generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_latents", [1, 4])
def test_cached_and_uncached_greedy_generation_are_identical(initial_latents):
    """18 new tokens on a 10-token prompt with at most 6 latents: the latents grow, then every step moves one into the
    prefix; both phases must give the uncached logits."""
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 10))
    kwargs = dict(max_new_tokens=18, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(prompt, use_cache=True, num_latents=initial_latents, **kwargs)
    uncached = model.generate(prompt, use_cache=False, num_latents=initial_latents, **kwargs)
    assert cached.sequences.shape == (2, 28)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, atol=1e-5, rtol=1e-5)
    # Step i of generation used min(initial + i, 6) latents: the last step's logits are the forward pass's.
    last = model(cached.sequences[:, :-1], num_latents=min(initial_latents + 17, 6)).logits[:, -1]
    torch.testing.assert_close(cached.logits[-1], last, atol=1e-5, rtol=1e-5)
    # Uncached generation with the other schedule differs (the schedule matters, so the test above can fail).
    other = model(cached.sequences[:, :10], num_latents=6).logits[:, -1]
    assert not torch.allclose(other, cached.logits[0], atol=1e-4)


def test_forward_with_cache_step_by_step():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 9))
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :5], num_latents=2, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 2  # all keys; latent keys
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        full = model(ids[:, : t + 1], num_latents=t + 1 - 3).logits[:, -1]
        torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=1e-5)
    # All 6 latents in use: one more token without moving a latent into the prefix is refused.
    with pytest.raises(ValueError, match=r"past_key_values holds 6 latents.*generate\(\) does this"):
        model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)


def test_batched_generation_with_left_padding_matches_single_prompts():
    model = tiny_model(pad_token_id=0)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (9, 5)]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p) :], mask[i, 9 - len(p) :] = p, 1
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for use_cache in (True, False):
        together = model.generate(batch, attention_mask=mask, use_cache=use_cache, num_latents=2, **kwargs)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], use_cache=use_cache, num_latents=2, **kwargs)
            assert torch.equal(together.sequences[i, 9:], alone.sequences[0, len(p) :])
            for a, b in zip(together.logits, alone.logits, strict=True):
                torch.testing.assert_close(a[i], b[0], atol=1e-5, rtol=1e-5)
    # Without the mask, the padding is read as text and the short prompt's logits change.
    unmasked = model.generate(batch, attention_mask=torch.ones_like(mask), use_cache=True, num_latents=2, **kwargs)
    assert not torch.allclose(unmasked.logits[0][1], together.logits[0][1], atol=1e-4)


# --- training ---------------------------------------------------------------------------------------------------


def test_prefix_dropout_in_training_only():
    model = tiny_model(prefix_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 24))
    model.train()
    losses = {round(model(ids, labels=ids).loss.item(), 6) for _ in range(4)}
    assert len(losses) > 1  # a different random prefix each step
    model.eval()
    assert model(ids, labels=ids).loss.item() == model(ids, labels=ids).loss.item()
    model.train()
    with pytest.raises(ValueError, match="prefix dropout"):
        model(ids, use_cache=True)
    # No prefix, nothing to drop: training and eval agree.
    short = ids[:, :6]
    torch.testing.assert_close(model(short, labels=short).loss, model.eval()(short, labels=short).loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model(prefix_dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.cross_attention.attention.k_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_trainer_reduces_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = tiny_model(prefix_dropout=0.25).train()
    # A learnable pattern: each sequence counts up from a random start.
    starts = torch.randint(0, VOCAB, (64, 1))
    ids = (starts + torch.arange(20)) % VOCAB
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=8, learning_rate=1e-2,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    before = model.eval()(ids[:16], labels=ids[:16]).loss.item()
    trainer = Trainer(model=model.train(), args=args, train_dataset=data)
    trainer.train()
    after = model.eval()(ids[:16], labels=ids[:16]).loss.item()
    assert after < 0.7 * before, (before, after)


# --- saving, Auto classes, pipeline -------------------------------------------------------------------------------


def test_save_and_load_through_the_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "perceiver_ar"
    assert saved["auto_map"]["AutoModelForCausalLM"].endswith("PerceiverARForCausalLM")
    assert (tmp_path / "modeling_perceiver_ar.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PerceiverARConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PerceiverARForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(0, VOCAB, (1, 14))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def _pipeline_folder(tmp_path, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model


def test_text_generation_pipeline_with_the_byte_level_tokenizer(tmp_path):
    tokenizer = PerceiverTokenizer()
    model = _pipeline_folder(tmp_path, tokenizer)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is PerceiverARForCausalLM
    # A causal LM continues the text itself: no [CLS] ... [SEP] around the prompt.
    out = generator("The movie", max_new_tokens=8, do_sample=False, add_special_tokens=False)[0]["generated_text"]
    ids = tokenizer("The movie", add_special_tokens=False, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert out.startswith("The movie")
    assert len(expected[0]) == ids.shape[1] + 8


def test_text_generation_pipeline_with_a_wordpiece_tokenizer(tmp_path, imdb_texts):
    tokenizer = perceiver_hf.train_wordpiece_tokenizer(imdb_texts[:100], vocab_size=300)
    _pipeline_folder(tmp_path, tokenizer)
    generator = pipeline("text-generation", model=str(tmp_path))
    outputs = generator(
        ["a great film", "the worst"], max_new_tokens=5, do_sample=False, batch_size=2, add_special_tokens=False
    )
    texts = [o[0]["generated_text"] for o in outputs]
    assert texts[0].startswith("a great film") and texts[1].startswith("the worst")
    assert all(len(t.split()) > 2 for t in texts)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    too_long = torch.randint(0, VOCAB, (1, 49))
    with pytest.raises(ValueError, match=r"input_ids: the context of 49 tokens .* max_position_embeddings \(48\)"):
        model(too_long)
    with pytest.raises(ValueError, match=r"input_ids: the prompt has 49 tokens, more than max_position_embeddings"):
        model.generate(too_long, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids: generation reached 49 tokens, more than max_position_embeddings"):
        model.generate(too_long[:, :40], max_new_tokens=20, do_sample=False)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids: the prompt is empty \(shape \(1, 0\)\)"):
        model.generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must hold at least one token, got shape \(1, 0\)"):
        model(empty)
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match=r"num_latents \(7\) must be an integer in \[1, 6\]"):
        model(ids, num_latents=7)
    with pytest.raises(ValueError, match=r"num_latents \(0\) must be an integer in \[1, 6\]"):
        model.generate(ids, num_latents=0)
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(1, 8\), got \(1, 7\)"):
        model(ids, labels=ids[:, :7])
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \(1, 8\), got \(1, 7\)"):
        model(ids, attention_mask=torch.ones(1, 7))


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match=r"num_latents \(64\) must be at most max_position_embeddings \(48\)"):
        tiny_config(num_latents=64)
    with pytest.raises(
        ValueError, match=r"self_attention_qk_channels \(15\) must be divisible by num_self_attention_heads \(2\)"
    ):  # noqa: E501
        tiny_config(self_attention_qk_channels=15)
    with pytest.raises(ValueError, match=r"prefix_dropout \(1.0\) must be in \[0, 1\)"):
        tiny_config(prefix_dropout=1.0)


# --- the core blocks' extensions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_perceiver_attention_per_query_mask_rotary_and_cache(attn_implementation):
    config = PerceiverConfig(attn_implementation=attn_implementation)
    config._attn_implementation = attn_implementation
    attention = PerceiverAttention(config, num_heads=2, q_channels=8, kv_channels=8).eval()
    x_q, x_kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    # A per-query mask whose rows are all the padding mask equals the padding mask.
    out2d, _ = attention(x_q, x_kv, pad)
    out3d, _ = attention(x_q, x_kv, pad[:, None, :].expand(2, 3, 5))
    torch.testing.assert_close(out2d, out3d)
    # A causal per-query mask: query i sees keys <= i + 2 (right-aligned), so changing the last key leaves the first
    # two queries unchanged.
    causal = torch.ones(3, 5, dtype=torch.bool).tril(2).expand(2, 3, 5)
    changed = x_kv.clone()
    changed[:, -1] += 1.0
    a, _ = attention(x_q, x_kv, causal)
    b, _ = attention(x_q, changed, causal)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])
    # Rotary at position 0 is the identity; at other positions it depends only on the position difference.
    zeros = torch.zeros(2, 5, 2)
    torch.testing.assert_close(
        apply_rotary_position_embeddings(torch.randn(2, 2, 5, 4), zeros.cos(), zeros.sin()).shape, (2, 2, 5, 4)
    )  # noqa: E501
    from perceiver_hf.modeling_perceiver_ar import rotary_cos_sin

    def rotated(offset):
        pos = torch.arange(5).expand(2, 5) + offset
        rot = rotary_cos_sin(pos, 4, 10000.0, torch.float32)
        return attention(x_kv, x_kv, position_embeddings=(rot, rot))[0]

    torch.testing.assert_close(rotated(0), rotated(7), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated(0), attention(x_kv, x_kv)[0], atol=1e-4)
    # A cache: keys/values of two calls equal those of one.
    cache = DynamicCache()
    attention(x_q[:, :1], x_kv[:, :3], past_key_values=cache, layer_idx=0)
    stepped, _ = attention(x_q, x_kv[:, 3:], past_key_values=cache, layer_idx=0)
    torch.testing.assert_close(stepped, attention(x_q, x_kv)[0], atol=1e-6, rtol=1e-5)


# --- examples/run_clm.py ----------------------------------------------------------------------------------------


def test_run_clm_trains_reports_bits_and_resumes_exactly(tmp_path):
    """A tiny run on the shipped sample: bits per token/byte are reported, the saved folder loads in the pipeline,
    and a run resumed from its step-2 checkpoint ends with the uninterrupted run's validation loss."""
    import importlib
    import sys

    examples = str(perceiver_hf.__file__).rsplit("/perceiver_hf/", 1)[0] + "/examples"
    # The benchmarks have a `common` module too: make sure run_clm imports the examples' one.
    other = sys.modules.get("common")
    if other is not None and not str(getattr(other, "__file__", "")).startswith(examples):
        del sys.modules["common"]
    sys.path.insert(0, examples)
    try:
        run_clm = importlib.import_module("run_clm")
    finally:
        sys.path.remove(examples)
        if other is not None:
            sys.modules["common"] = other
    common = [
        "--max_train_samples", "40", "--max_eval_samples", "8", "--max_seq_len", "64", "--num_latents", "16",
        "--hidden_size", "16", "--num_heads", "2", "--num_self_attention_layers", "1", "--batch_size", "4",
        "--max_steps", "4", "--eval_steps", "4", "--logging_steps", "2", "--max_new_tokens", "4",
        "--prompts", "The film",
    ]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_clm.main([*common, "--output_dir", str(full)])
    results = json.loads((full / "eval_results.json").read_text())
    assert results["bits_per_token"] == pytest.approx(results["loss"] / math.log(2))
    assert 6.0 < results["bits_per_token"] < 8.5  # near log2(262) after 4 steps, not NaN or 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(full), PerceiverARForCausalLM)
    # Stop after step 2 (a checkpoint), then resume to step 4.
    log = tmp_path / "losses.jsonl"
    run_clm.main([*common, "--output_dir", str(resumed), "--checkpointing_steps", "2", "--loss_log_file", str(log)])
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "step_4")
    run_clm.main(
        [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", "--loss_log_file", str(log)]
    )
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 4]  # the resumed run started after step 2, not from scratch
    assert logged[2]["loss"] == pytest.approx(logged[1]["loss"], abs=1e-6)
    assert json.loads((resumed / "eval_results.json").read_text())["loss"] == pytest.approx(results["loss"], abs=1e-6)
