"""Sentiment classification (issue 3): the classifier built from a masked-LM checkpoint, its losses, a frozen
encoder, `transformers.Trainer`, the text-classification pipelines and `examples/run_text_classification.py`.

Everything runs offline on tiny models and the IMDb sample shipped in `examples/data`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DATA_DIR, REPO_ROOT
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    pipeline,
)

from perceiver_hf import (
    PerceiverConfig,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    train_wordpiece_tokenizer,
)

MAX_LEN = 128  # max_position_embeddings of the tiny models and the tokenizer's model_max_length
ID2LABEL = {0: "neg", 1: "pos"}
LABEL2ID = {"neg": 0, "pos": 1}
ACCURACY_METRIC = REPO_ROOT / "examples" / "metrics" / "accuracy"


def tiny_config(vocab_size: int, pad_token_id: int, **overrides) -> PerceiverConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_LEN,
        d_model=16,
        num_latents=8,
        d_latents=16,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        num_self_attention_layers_per_block=1,
        num_decoder_heads=1,
        pad_token_id=pad_token_id,
    )
    kwargs.update(overrides)
    return PerceiverConfig(**kwargs)


@pytest.fixture(scope="module")
def tokenizer(imdb_texts: list[str]):
    """A 1000-token WordPiece tokenizer trained on the IMDb training sample, cutting texts at `MAX_LEN`."""
    return train_wordpiece_tokenizer(imdb_texts, vocab_size=1000, model_max_length=MAX_LEN)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved (untrained) tiny masked LM with its tokenizer, as run_mlm.py writes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mlm")
    PerceiverForMaskedLM(tiny_config(len(tokenizer), tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def classifier_from_mlm(mlm_dir: Path, **kwargs) -> PerceiverForSequenceClassification:
    return PerceiverForSequenceClassification.from_pretrained(
        mlm_dir, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, **kwargs
    )


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("perceiver.")}


def decoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("classification_decoder.")}


def all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def none_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return not any(torch.equal(a[k], b[k]) for k in a)


def review_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, return_tensors="pt")


# --------------------------------------------------------------------------------------------------
# Model: loading from a masked LM, losses, freezing
# --------------------------------------------------------------------------------------------------


def test_from_mlm_checkpoint_keeps_encoder_and_initialises_decoder(mlm_dir: Path) -> None:
    mlm = PerceiverForMaskedLM.from_pretrained(mlm_dir)
    clf, info = classifier_from_mlm(mlm_dir, output_loading_info=True)

    # The text adapter and encoder are carried over exactly ...
    mlm_encoder = encoder_state(mlm)
    assert len(mlm_encoder) > 0
    assert all_equal(encoder_state(clf), mlm_encoder)
    # ... and transformers reports the classification decoder as new and the masked-LM decoder as unused.
    assert set(info["missing_keys"]) == set(decoder_state(clf))
    saved_keys = load_file(mlm_dir / "model.safetensors").keys()  # the tied output embedding is not saved
    assert set(info["unexpected_keys"]) == {k for k in saved_keys if k.startswith("decoder.")}
    assert not info["mismatched_keys"]

    # The new decoder is initialised, not left empty: finite weights, learned queries at initializer_range.
    for name, tensor in decoder_state(clf).items():
        assert torch.isfinite(tensor).all(), name
    std = clf.classification_decoder.output_query.std().item()
    assert 0.3 * clf.config.initializer_range < std < 2 * clf.config.initializer_range
    assert clf.config.id2label == ID2LABEL and clf.config.label2id == LABEL2ID
    assert clf.config.num_labels == 2 and clf.classification_decoder.output_adapter.linear.out_features == 2


def test_from_mlm_checkpoint_through_auto_class(mlm_dir: Path) -> None:
    clf = AutoModelForSequenceClassification.from_pretrained(mlm_dir, num_labels=2, id2label=ID2LABEL)
    assert isinstance(clf, PerceiverForSequenceClassification)
    assert all_equal(encoder_state(clf), encoder_state(PerceiverForMaskedLM.from_pretrained(mlm_dir)))


LOSS_CASES = {
    "single_label": (
        "single_label_classification",
        3,
        torch.tensor([0, 2, 1, 2]),
        lambda logits, labels: F.cross_entropy(logits, labels),
    ),
    "multi_label": (
        "multi_label_classification",
        3,
        torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
        lambda logits, labels: F.binary_cross_entropy_with_logits(logits, labels),
    ),
    "regression": (
        "regression",
        1,
        torch.tensor([0.5, -1.0, 2.0, 0.0]),
        lambda logits, labels: F.mse_loss(logits.squeeze(-1), labels),
    ),
    "multi_target_regression": (
        "regression",
        3,
        torch.arange(12, dtype=torch.float32).reshape(4, 3) / 5,
        lambda logits, labels: F.mse_loss(logits, labels),
    ),
}


def _loss_case(problem_type: str | None, num_labels: int, labels: torch.Tensor):
    model = PerceiverForSequenceClassification(tiny_config(50, 0, num_labels=num_labels, problem_type=problem_type))
    input_ids = torch.randint(1, 50, (4, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return model, model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_matches_torch(case: str) -> None:
    problem_type, num_labels, labels, reference = LOSS_CASES[case]
    model, outputs = _loss_case(problem_type, num_labels, labels)

    assert outputs.logits.shape == (4, num_labels)
    torch.testing.assert_close(outputs.loss, reference(outputs.logits, labels), rtol=0, atol=0)
    # The loss is differentiable back to the encoder.
    outputs.loss.backward()
    assert model.perceiver.encoder.latent.grad is not None


@pytest.mark.parametrize("case", ["single_label", "multi_label", "regression"])
def test_problem_type_is_inferred_like_transformers(case: str) -> None:
    # transformers' heads: num_labels == 1 -> regression; integer labels -> single-label; else multi-label.
    problem_type, num_labels, labels, reference = LOSS_CASES[case]
    model, outputs = _loss_case(None, num_labels, labels)
    assert model.config.problem_type == problem_type
    torch.testing.assert_close(outputs.loss, reference(outputs.logits, labels), rtol=0, atol=0)


@pytest.mark.parametrize(
    "problem_type, num_labels, labels, expected",
    [
        ("single_label_classification", 2, torch.tensor([[0, 1]] * 4), r"labels must have shape \(batch,\)"),
        ("multi_label_classification", 3, torch.ones(4, 2), r"multi-label labels must have shape \(4, 3\)"),
        ("regression", 1, torch.ones(4, 2), r"regression labels must have shape \(batch,\)"),
        ("regression", 3, torch.ones(4), r"regression labels must have shape \(4, 3\)"),
    ],
)
def test_bad_label_shapes_raise(problem_type, num_labels, labels, expected) -> None:
    model = PerceiverForSequenceClassification(tiny_config(50, 0, num_labels=num_labels, problem_type=problem_type))
    with pytest.raises(ValueError, match=expected):
        model(input_ids=torch.randint(1, 50, (4, 6)), labels=labels)


def _train_steps(model: PerceiverForSequenceClassification, batch: dict[str, torch.Tensor], steps: int) -> None:
    """A few AdamW steps with weight decay, given every parameter (frozen or not) as a careless user would."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_frozen_encoder_does_not_change_and_unfreezing_trains_it(mlm_dir: Path, tokenizer, imdb_texts) -> None:
    clf = classifier_from_mlm(mlm_dir, freeze_encoder=True, dropout=0.1)
    encoder = encoder_state(clf)
    assert not any(p.requires_grad for p in clf.perceiver.parameters())
    assert all(p.requires_grad for p in clf.classification_decoder.parameters())
    batch = {**review_batch(tokenizer, imdb_texts[:2] + imdb_texts[-2:]), "labels": torch.tensor([0, 0, 1, 1])}

    decoder = decoder_state(clf)
    _train_steps(clf, batch, steps=3)
    assert all_equal(encoder_state(clf), encoder)  # bit-identical, weight decay included
    assert none_equal(decoder_state(clf), decoder)  # every decoder tensor moved
    assert all(p.grad is None for p in clf.perceiver.parameters())

    clf.unfreeze_encoder()
    assert clf.config.freeze_encoder is False
    _train_steps(clf, batch, steps=2)
    assert none_equal(encoder_state(clf), encoder)


def test_freezing_drops_stale_gradients(mlm_dir: Path, tokenizer, imdb_texts) -> None:
    # Freezing between backward() and step() must not let the pending encoder gradients through.
    clf = classifier_from_mlm(mlm_dir)
    optimizer = torch.optim.AdamW(clf.parameters(), lr=1e-2, weight_decay=0.5)
    batch = {**review_batch(tokenizer, imdb_texts[:2]), "labels": torch.tensor([0, 1])}
    clf(**batch).loss.backward()
    encoder = encoder_state(clf)
    clf.freeze_encoder()
    optimizer.step()
    assert all_equal(encoder_state(clf), encoder)


@pytest.mark.parametrize("loader", [PerceiverForSequenceClassification, AutoModelForSequenceClassification])
def test_freeze_flag_survives_save_and_load(mlm_dir: Path, tmp_path: Path, loader) -> None:
    clf = classifier_from_mlm(mlm_dir)
    clf.freeze_encoder()
    clf.save_pretrained(tmp_path / "frozen")
    assert json.loads((tmp_path / "frozen" / "config.json").read_text())["freeze_encoder"] is True

    frozen = loader.from_pretrained(tmp_path / "frozen")
    assert frozen.config.freeze_encoder is True
    assert not any(p.requires_grad for p in frozen.perceiver.parameters())
    assert all(p.requires_grad for p in frozen.classification_decoder.parameters())
    # The flag is a config field, so from_pretrained overrides it like any other.
    overridden = loader.from_pretrained(tmp_path / "frozen", freeze_encoder=False)
    assert all(p.requires_grad for p in overridden.parameters())

    frozen.unfreeze_encoder()
    frozen.save_pretrained(tmp_path / "unfrozen")
    unfrozen = loader.from_pretrained(tmp_path / "unfrozen")
    assert unfrozen.config.freeze_encoder is False
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_inputs_longer_than_the_positions_are_cut(mlm_dir: Path) -> None:
    clf = classifier_from_mlm(mlm_dir).eval()
    input_ids = torch.randint(5, clf.config.vocab_size, (2, MAX_LEN + 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, MAX_LEN - 10 :] = 0  # the second row is shorter than the model's positions
    with torch.no_grad():
        long = clf(input_ids=input_ids, attention_mask=attention_mask).logits
        cut = clf(input_ids=input_ids[:, :MAX_LEN], attention_mask=attention_mask[:, :MAX_LEN]).logits
    torch.testing.assert_close(long, cut, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# transformers.Trainer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imdb_tokenized(tokenizer):
    """64 shuffled training reviews and 32 test reviews of the shipped sample, tokenized to `MAX_LEN` tokens."""
    raw = load_dataset(
        "parquet",
        data_files={"train": str(DATA_DIR / "imdb_train.parquet"), "test": str(DATA_DIR / "imdb_test.parquet")},
    )
    raw["train"] = raw["train"].shuffle(seed=0).select(range(64))
    raw["test"] = raw["test"].shuffle(seed=0).select(range(32))
    return raw.map(lambda batch: tokenizer(batch["text"], truncation=True), batched=True, remove_columns=["text"])


@pytest.mark.parametrize("freeze", [False, True], ids=["fine-tune", "frozen-encoder"])
def test_trainer_fine_tunes_evaluates_saves_and_reloads(
    mlm_dir: Path, tokenizer, imdb_tokenized, tmp_path: Path, freeze: bool
) -> None:
    model = classifier_from_mlm(mlm_dir, freeze_encoder=freeze, dropout=0.1)
    encoder, decoder = encoder_state(model), decoder_state(model)
    accuracy = evaluate.load(str(ACCURACY_METRIC), keep_in_memory=True)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits, labels = eval_prediction
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        weight_decay=0.1,
        logging_steps=2,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    # No glue: the default collator pads with the tokenizer and renames "label" to "labels".
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=imdb_tokenized["train"],
        eval_dataset=imdb_tokenized["test"],
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    train_result = trainer.train()
    assert trainer.state.global_step == 4
    assert np.isfinite(train_result.training_loss)
    assert none_equal(decoder_state(model), decoder)
    assert all_equal(encoder_state(model), encoder) is freeze

    metrics = trainer.evaluate()
    predictions = trainer.predict(imdb_tokenized["test"])
    expected = float(np.mean(predictions.predictions.argmax(-1) == np.array(imdb_tokenized["test"]["label"])))
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    assert np.isfinite(metrics["eval_loss"])

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(saved)
    assert reloaded.config.freeze_encoder is freeze
    batch = review_batch(reloaded_tokenizer, ["a wonderful film", "dull and far too long " * 3])
    model.eval()
    # The weights are bit-identical; outputs may differ in the last bit (a loaded tensor's memory alignment can
    # change the CPU matmul path), so they are compared within 1e-6.
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[name], value) for name, value in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, mlm_dir: Path, tokenizer) -> Path:
    """A saved classifier whose decoder is randomised enough to give distinct, non-0.5 scores."""
    torch.manual_seed(1)
    clf = classifier_from_mlm(mlm_dir)
    with torch.no_grad():
        clf.classification_decoder.output_adapter.linear.weight.normal_(std=2.0)
    path = tmp_path_factory.mktemp("classifier")
    clf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def expected_predictions(model_dir: Path, texts: list[str], truncation: bool = True) -> list[dict]:
    """What a pipeline should return, computed by hand: softmax of the logits, best label first."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = []
    for text in texts:  # one text at a time: no padding, as the pipeline without batch_size
        with torch.no_grad():
            probs = model(**tokenizer(text, truncation=truncation, return_tensors="pt")).logits.softmax(-1)[0]
        best = int(probs.argmax())
        results.append({"label": model.config.id2label[best], "score": probs[best].item()})
    return results


def assert_predictions_close(actual: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in actual] == [p["label"] for p in expected]
    np.testing.assert_allclose([p["score"] for p in actual], [p["score"] for p in expected], rtol=1e-5)


@pytest.mark.parametrize("task", ["text-classification", "sentiment-analysis"])
def test_pipeline_returns_labels_with_scores(classifier_dir: Path, imdb_texts: list[str], task: str) -> None:
    classifier = pipeline(task, model=str(classifier_dir), device="cpu")
    texts = ["What a wonderful, touching film.", "Terrible acting and a boring plot.", imdb_texts[0][:200]]

    single = classifier(texts[0])
    assert isinstance(single, list) and len(single) == 1
    assert set(single[0]) == {"label", "score"} and single[0]["label"] in LABEL2ID
    assert 0.5 <= single[0]["score"] <= 1.0
    assert_predictions_close(single, expected_predictions(classifier_dir, texts[:1]))

    batch = classifier(texts)
    assert len(batch) == 3
    assert_predictions_close(batch, expected_predictions(classifier_dir, texts))
    # Batched inference pads; the attention mask keeps the scores those of the texts on their own.
    assert_predictions_close(classifier(texts, batch_size=3), batch)

    both = classifier(texts[0], top_k=None)
    assert sorted(p["label"] for p in both) == ["neg", "pos"]
    assert sum(p["score"] for p in both) == pytest.approx(1.0)


def test_pipeline_truncates_long_reviews(classifier_dir: Path, tokenizer, imdb_texts: list[str]) -> None:
    long_review = " ".join(imdb_texts[:5])
    assert len(tokenizer(long_review)["input_ids"]) > 3 * MAX_LEN
    classifier = pipeline("sentiment-analysis", model=str(classifier_dir), device="cpu")

    # With no argument the model cuts the tokens beyond its positions (first MAX_LEN tokens kept).
    default = classifier(long_review)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        ids = tokenizer(long_review, return_tensors="pt")["input_ids"][:, :MAX_LEN]
        probs = model(input_ids=ids).logits.softmax(-1)[0]
    assert default[0]["label"] == model.config.id2label[int(probs.argmax())]
    assert default[0]["score"] == pytest.approx(probs.max().item(), rel=1e-5)

    # truncation=True truncates in the tokenizer, at the saved model_max_length (keeping [SEP]).
    truncated = classifier(long_review, truncation=True)
    assert_predictions_close(truncated, expected_predictions(classifier_dir, [long_review], truncation=True))

    # A batch mixing long and short reviews works too.
    mixed = classifier([long_review, "short and sweet", long_review], batch_size=3, truncation=True)
    assert len(mixed) == 3 and mixed[0]["label"] == mixed[2]["label"]
    assert mixed[0]["score"] == pytest.approx(mixed[2]["score"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# examples/run_text_classification.py
# --------------------------------------------------------------------------------------------------

SCRIPT = REPO_ROOT / "examples" / "run_text_classification.py"
# Tiny runs on the shipped sample: 48 training reviews (6 batches), 16 validation reviews.
QUICK = [
    "--max_train_samples", "48", "--max_eval_samples", "16", "--batch_size", "8", "--lr_scheduler", "constant",
    "--logging_steps", "2",
]  # fmt: skip


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *QUICK, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"run_text_classification.py {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


def test_two_stage_recipe_end_to_end(mlm_dir: Path, tmp_path: Path) -> None:
    stage1, stage2, resumed = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "resumed"

    # Stage 1: classification decoder on the frozen encoder of the masked LM.
    stage1_args = ["--freeze_encoder", "--max_steps", "4", "--max_seq_len", "64"]
    run_script("--mlm_checkpoint", str(mlm_dir), *stage1_args, "--output_dir", str(stage1))
    mlm_weights = load_file(mlm_dir / "model.safetensors")
    stage1_weights = load_file(stage1 / "model.safetensors")
    encoder_keys = [k for k in stage1_weights if k.startswith("perceiver.")]
    decoder_keys = [k for k in stage1_weights if k.startswith("classification_decoder.")]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(stage1_weights[k], mlm_weights[k]) for k in encoder_keys)
    config1 = json.loads((stage1 / "config.json").read_text())
    assert config1["freeze_encoder"] is True and config1["id2label"] == {"0": "neg", "1": "pos"}
    results1 = json.loads((stage1 / "eval_results.json").read_text())
    assert 0.0 <= results1["accuracy"] <= 1.0 and np.isfinite(results1["loss"])
    # The saved tokenizer cuts texts at the training length, so pipelines can truncate with it.
    assert AutoTokenizer.from_pretrained(stage1).model_max_length == 64

    # Stage 2: everything unfrozen, lower learning rate, dropout on; a checkpoint half-way.
    stage2_args = ["--learning_rate", "1e-4", "--dropout", "0.1", "--max_steps", "4", "--checkpointing_steps", "2"]
    result = run_script("--clf_checkpoint", str(stage1), *stage2_args, "--output_dir", str(stage2))
    stage2_weights = load_file(stage2 / "model.safetensors")
    assert not any(torch.equal(stage2_weights[k], stage1_weights[k]) for k in encoder_keys)
    assert not any(torch.equal(stage2_weights[k], stage1_weights[k]) for k in decoder_keys)
    assert json.loads((stage2 / "config.json").read_text())["freeze_encoder"] is False
    # Without --max_seq_len, texts are cut at the model's positions.
    assert AutoTokenizer.from_pretrained(stage2).model_max_length == MAX_LEN
    assert "Predictions of pipeline('sentiment-analysis'" in result.stdout

    # Resuming stage 2 from its step-2 checkpoint ends with exactly the same weights (dropout included).
    run_script(
        "--clf_checkpoint", str(stage1), *stage2_args, "--output_dir", str(resumed),
        "--resume_from_checkpoint", str(stage2 / "checkpoints" / "step_2"),
    )  # fmt: skip
    resumed_weights = load_file(resumed / "model.safetensors")
    assert all(torch.equal(resumed_weights[k], stage2_weights[k]) for k in stage2_weights)

    classifier = pipeline("sentiment-analysis", model=str(stage2), device="cpu")
    assert classifier("A truly great movie.")[0]["label"] in ("neg", "pos")


@pytest.fixture(scope="module")
def script_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run_text_classification
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return run_text_classification


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give exactly one of --mlm_checkpoint"),
        (["--mlm_checkpoint", "a", "--clf_checkpoint", "b"], "give exactly one of --mlm_checkpoint"),
        (["--mlm_checkpoint", "a", "--max_seq_len", "2"], "--max_seq_len: must be >= 3"),
    ],
)
def test_script_rejects_bad_options(script_module, capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        script_module.parse_cli(argv)
    assert message in capsys.readouterr().err


def test_script_encodes_string_and_integer_labels(script_module) -> None:
    from datasets import Dataset, DatasetDict

    strings = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]}),
            "validation": Dataset.from_dict({"text": ["d"], "label": ["neg"]}),
        }
    )
    encoded, names = script_module.encode_labels(strings, "label")
    assert names == ["neg", "pos"] and encoded["train"]["label"] == [1, 0, 1]

    # Unlabelled rows (-1, as in IMDb's unsupervised split) are dropped.
    integers = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, -1, 0]})})
    encoded, names = script_module.encode_labels(integers, "label")
    assert names == ["0", "1"] and encoded["train"]["label"] == [1, 0]

    gaps = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 2]})})
    with pytest.raises(ValueError, match="class ids 0..K-1"):
        script_module.encode_labels(gaps, "label")


def test_script_rejects_max_seq_len_beyond_the_model(script_module, mlm_dir: Path, tmp_path: Path) -> None:
    argv = ["--mlm_checkpoint", str(mlm_dir), "--max_seq_len", str(MAX_LEN + 1), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"--max_seq_len \({MAX_LEN + 1}\) exceeds the max_position_embeddings"):
        script_module.main(argv)
    assert not (tmp_path / "out").exists()  # checked before anything is written
