"""Tests of the Hugging Face integration: save/load, Auto classes, remote code, tokenizer and pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from perceiver_tester import (
    HEAD_SPECS,
    HeadSpec,
    spec_ids,
    sys_path_without_the_package,
    text_batch,
    tiny_image_config,
    tiny_text_config,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from perceiver_hf import (
    PerceiverAttention,
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForMultimodalClassification,
    PerceiverForSequenceClassification,
    PerceiverModel,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def assert_same_state(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    expected, actual = saved.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), f"{key} differs after reloading"


def assert_safetensors_only(directory: Path) -> None:
    names = {path.name for path in directory.iterdir()}
    assert "model.safetensors" in names and "config.json" in names, names
    pickled = sorted(path.name for path in directory.iterdir() if path.suffix in PICKLE_SUFFIXES)
    assert not pickled, f"pickle files written: {pickled}"


# ---------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained and the Auto classes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_save_and_load_round_trip_is_bit_exact(spec: HeadSpec, tmp_path: Path) -> None:
    model = spec.build()
    # Move every weight away from its initial value, so a loader that re-initialises anything is caught.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path)
    assert_safetensors_only(tmp_path)

    for loader in (spec.model_class, spec.auto_class):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is spec.model_class
        assert_same_state(loaded, model)
        inputs = spec.inputs(model.config, [9, 4])
        with torch.no_grad():
            # The weights are bit-identical (above). The outputs may differ in the last bit: loaded tensors are
            # memory-mapped from the safetensors file, and CPU matmul kernels pick their code path by alignment.
            torch.testing.assert_close(
                spec.main_output(loaded(**inputs)), spec.main_output(model.eval()(**inputs)), rtol=1e-6, atol=1e-6
            )


# Heads with a loss; the multimodal head takes a dict per modality and has its own Trainer test (test_multimodal).
TRAINER_SPECS = [
    spec
    for spec in HEAD_SPECS
    if spec.make_labels is not None and spec.model_class is not PerceiverForMultimodalClassification
]


@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=spec_ids(TRAINER_SPECS))
def test_trainer_trains_every_head_without_glue(spec: HeadSpec, tmp_path: Path) -> None:
    """`transformers.Trainer` with its default collator and column filtering on a `datasets.Dataset` of the
    head's own inputs: the loss comes from `labels`, every parameter with a gradient moves, evaluation
    reports a finite loss, and the saved model reloads through its Auto class with the trained outputs."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = spec.build(seed=0).train()
    inputs = spec.inputs(model.config, [5, 3, 4, 2, 5, 1, 3, 4])
    columns = {**inputs, "labels": spec.labels(model.config, inputs), "unused": torch.arange(8)}
    dataset = Dataset.from_dict({name: values.tolist() for name, values in columns.items()}).with_format("torch")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    trained = dict(model.named_parameters())
    moved = [name for name in before if not torch.equal(before[name], trained[name].detach())]
    assert len(moved) >= 0.8 * len(before), sorted(set(before) - set(moved))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = spec.auto_class.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is spec.model_class
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(spec.main_output(reloaded(**inputs)), spec.main_output(model(**inputs)))


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied", "untied"])
def test_mlm_output_embedding_tying_survives_save_and_load(tie_word_embeddings: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(tiny_text_config(tie_word_embeddings=tie_word_embeddings)).eval()
    if not tie_word_embeddings:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(3.0)  # clearly different from the input embedding
    model.save_pretrained(tmp_path)
    loaded = PerceiverForMaskedLM.from_pretrained(tmp_path).eval()
    assert_same_state(loaded, model)
    input_weight = loaded.perceiver.get_input_embeddings().weight
    output_weight = loaded.get_output_embeddings().weight
    assert (output_weight is input_weight) == tie_word_embeddings
    if not tie_word_embeddings:
        assert not torch.equal(output_weight, input_weight)
    input_ids, attention_mask = text_batch(model.config, [7, 3])
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
            model(input_ids=input_ids, attention_mask=attention_mask).logits,
        )


def test_auto_classes_resolve_to_perceiver_classes(tmp_path: Path) -> None:
    settings = {key: value for key, value in tiny_text_config().to_diff_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("perceiver_io", **settings)
    assert type(config) is PerceiverConfig
    assert config.to_dict() == tiny_text_config().to_dict()
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is PerceiverConfig

    expected = {
        AutoModel: PerceiverModel,
        AutoModelForMaskedLM: PerceiverForMaskedLM,
        AutoModelForSequenceClassification: PerceiverForSequenceClassification,
    }
    for auto_class, model_class in expected.items():
        assert type(auto_class.from_config(config)) is model_class, auto_class.__name__
    image_config = tiny_image_config()
    assert type(AutoModelForImageClassification.from_config(image_config)) is PerceiverForImageClassification


@pytest.mark.parametrize("spec", HEAD_SPECS, ids=spec_ids(HEAD_SPECS))
def test_from_pretrained_attn_implementation_reaches_every_attention_module(spec: HeadSpec, tmp_path: Path) -> None:
    spec.build().save_pretrained(tmp_path)
    for requested in ("eager", "sdpa"):
        model = spec.auto_class.from_pretrained(tmp_path, attn_implementation=requested)
        modules = [m for m in model.modules() if isinstance(m, PerceiverAttention)]
        assert modules and {m.config._attn_implementation for m in modules} == {requested}
    default = spec.auto_class.from_pretrained(tmp_path)
    assert {m.config._attn_implementation for m in default.modules() if isinstance(m, PerceiverAttention)} == {"sdpa"}


def test_classifier_from_masked_lm_checkpoint_keeps_the_encoder(tmp_path: Path) -> None:
    """Fine-tuning starts from a pretrained encoder: loading an MLM checkpoint into a classifier keeps
    the adapter and encoder weights and initialises only the new decoder."""
    torch.manual_seed(0)
    mlm = PerceiverForMaskedLM(tiny_text_config())
    mlm.save_pretrained(tmp_path)
    classifier = PerceiverForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert_same_state(classifier.perceiver, mlm.perceiver)
    assert classifier.config.num_labels == 2


# ---------------------------------------------------------------------------------------------------
# Remote code: loading where perceiver_hf is not installed
# ---------------------------------------------------------------------------------------------------

REMOTE_CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    sys.path[:] = json.loads(sys.argv[1])
    # The point of the test: this process cannot import the package, only the code saved with the model.
    assert importlib.util.find_spec("perceiver_hf") is None, "perceiver_hf is importable in the child"
    # Nor a `transformers_modules` package from another modules cache (it would shadow this process's own).
    assert importlib.util.find_spec("transformers_modules") is None, "a foreign transformers_modules is on the path"
    import torch
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    assert "perceiver_hf" not in sys.modules
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    # The model code was imported from the copy in this child's own modules cache.
    cache = os.path.realpath(os.environ["HF_MODULES_CACHE"])
    assert os.path.realpath(sys.modules[type(model).__module__].__file__).startswith(cache + os.sep)
    batch = torch.load(sys.argv[3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save({"logits": logits, "class": type(model).__name__}, sys.argv[4])
    """
)


def test_remote_code_loads_where_the_package_is_not_importable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(tiny_text_config()).eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)

    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_perceiver.PerceiverConfig"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_perceiver.PerceiverForMaskedLM"
    # The model code and everything it imports sit beside the weights.
    for name in ("configuration_perceiver.py", "modeling_perceiver.py", "adapters.py", "position_encoding.py"):
        assert (model_dir / name).is_file(), name
    for saved in model_dir.glob("*.py"):  # relative imports only, or the copy would need the package
        assert not re.search(r"^\s*(from|import)\s+perceiver_hf", saved.read_text(), re.MULTILINE), saved.name

    input_ids, attention_mask = text_batch(model.config, [9, 5])
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits

    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    # -I: ignore PYTHON* variables, the user site and the current directory; -S: no site-packages
    # .pth hooks (an editable install's import finder). The child gets an explicit sys.path instead.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            REMOTE_CHILD,
            json.dumps(sys_path_without_the_package()),
            str(model_dir),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    assert outputs["class"] == "PerceiverForMaskedLM"
    assert torch.equal(outputs["logits"], expected)


def test_child_interpreter_really_cannot_import_the_package() -> None:
    """Guards the test above: the same interpreter set-up fails to import perceiver_hf, while this
    process (with the repository or an editable install on its path) can."""
    assert importlib.util.find_spec("perceiver_hf") is not None
    child = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); import perceiver_hf"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", child, json.dumps(sys_path_without_the_package())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "No module named 'perceiver_hf'" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------
# Tokenizer and fill-mask pipeline
# ---------------------------------------------------------------------------------------------------


def test_tokenizer_reloads_with_auto_tokenizer(wordpiece_tokenizer, tmp_path: Path) -> None:
    wordpiece_tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert token in tokenizer.all_special_tokens and token in tokenizer.get_vocab(), token
    assert (tokenizer.pad_token, tokenizer.mask_token) == ("[PAD]", "[MASK]")
    assert len(tokenizer) == len(wordpiece_tokenizer) <= 500
    text = "I have watched this movie and it was awesome"
    assert tokenizer(text)["input_ids"] == wordpiece_tokenizer(text)["input_ids"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_fill_mask_pipeline_on_a_saved_model(wordpiece_tokenizer, tmp_path: Path) -> None:
    tokenizer = wordpiece_tokenizer
    torch.manual_seed(0)
    config = tiny_text_config(
        vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id
    )
    PerceiverForMaskedLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    fill_mask = pipeline("fill-mask", model=str(tmp_path))
    assert isinstance(fill_mask.model, PerceiverForMaskedLM)
    predictions = fill_mask("i have watched this [MASK] and it was awesome", top_k=3)
    assert len(predictions) == 3
    for prediction in predictions:
        assert {"token_str", "score", "token", "sequence"} <= set(prediction)
        assert 0.0 < prediction["score"] < 1.0
    scores = [prediction["score"] for prediction in predictions]
    assert scores == sorted(scores, reverse=True)

    # A batch of texts of different lengths (the pipeline pads them) gives one list per text.
    texts = ["this [MASK] is bad", "the acting was [MASK] but the story was not good at all"]
    batched = fill_mask(texts, top_k=2, batch_size=2)
    assert len(batched) == 2 and all(len(result) == 2 for result in batched)
    for text, result in zip(texts, batched, strict=True):
        single = fill_mask(text, top_k=2)
        assert [r["token_str"] for r in result] == [r["token_str"] for r in single]
        for r_batched, r_single in zip(result, single, strict=True):
            assert r_batched["score"] == pytest.approx(r_single["score"], abs=1e-5)
