"""Unit tests of the shared example plumbing in `examples/common.py` and the offline accuracy metric.

End-to-end runs of the scripts (kill and resume, bad options) are in `test_robustness.py`; these tests
check the helpers one by one, in well under a second each.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES_DIR))
try:
    common = importlib.import_module("common")
finally:
    sys.path.remove(str(EXAMPLES_DIR))


def parse(*argv: str) -> argparse.Namespace:
    return common.parse_args(common.build_parser("test"), list(argv))


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------- metric


def test_accuracy_metric_loads_offline_by_path() -> None:
    accuracy = common.load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[1, 0], references=[1, 1], normalize=False) == {"accuracy": 1.0}
    weighted = accuracy.compute(predictions=[1, 0, 1], references=[1, 1, 1], sample_weight=[1, 2, 1])
    assert weighted == {"accuracy": 0.5}


def test_unknown_metric_names_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match="available: .*accuracy"):
        common.load_metric("no_such_metric")


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch_size", "0"], "argument --batch_size: must be an integer >= 1, got '0'"),
        (["--learning_rate", "-1"], "argument --learning_rate: must be a number > 0"),
        (["--dropout", "1"], r"argument --dropout: must be a number in \[0, 1\)"),
        (["--train_file", "data.xlsx"], "argument --train_file: 'data.xlsx' has extension 'xlsx'"),
        (["--train_file", "missing.csv"], "argument --train_file: file 'missing.csv' does not exist"),
        (["--warmup_steps", "1"], "onecycle needs a rising phase of >= 2 steps, got 1"),
        (["--max_steps", "5", "--warmup_steps", "5"], r"must be < --max_steps \(5\), got 5"),
        (["--hub_model_id", "me/model"], "only apply with --push_to_hub"),
    ],
)
def test_bad_options_name_the_option_and_value(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message.replace("\\", "") in capsys.readouterr().err or pytest.fail(capsys.readouterr().err)


@pytest.mark.parametrize(
    "script", ["run_mlm", "run_text_classification", "run_image_classification", "run_audio_classification",
               "run_multimodal_classification"],
)  # fmt: skip
def test_help_shows_each_option_group_once(script: str, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).parse_cli(["--help"])
    assert exit_info.value.code == 0
    headings = [line for line in capsys.readouterr().out.splitlines() if line and line[0] != " " and line[-1] == ":"]
    assert {"data:", "training:", "run:"} <= set(headings)
    assert len(headings) == len(set(headings)), headings


def test_defaults_fill_the_evaluation_batch_size() -> None:
    args = parse("--batch_size", "7")
    assert args.eval_batch_size == 7 and args.lr_scheduler == "onecycle" and args.mixed_precision == "no"


# ------------------------------------------------------------------------------------------- data


def test_local_files_by_extension_and_held_out_validation(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20)))
    (tmp_path / "b.txt").write_text("".join(f"line {i}\n" for i in range(20)))
    csv = common.load_raw_datasets(
        parse("--train_file", str(tmp_path / "a.csv"), "--validation_split_percentage", "10")
    )
    assert (len(csv["train"]), len(csv["validation"])) == (18, 2)
    assert csv["train"].column_names == ["text", "label"]
    txt = common.load_raw_datasets(parse("--train_file", str(tmp_path / "b.txt"), "--max_train_samples", "5"))
    assert txt["train"].column_names == ["text"] and len(txt["train"]) == 5


def test_whole_groups_are_held_out_by_column_value(tmp_path: Path) -> None:
    """`--validation_split_column index --validation_split_values 0 1`: the rows of recordings 0 and 1 (of every
    speaker) are the validation split, the rest trains in its original order; the percentage is not used."""
    rows = [(speaker, index) for speaker in ("ann", "bob", "cat") for index in range(5)]
    Dataset.from_dict({"speaker": [s for s, _ in rows], "index": [i for _, i in rows]}).to_parquet(
        tmp_path / "a.parquet"
    )
    options = ("--train_file", str(tmp_path / "a.parquet"), "--validation_split_percentage", "50")
    raw = common.load_raw_datasets(
        parse(*options, "--validation_split_column", "index", "--validation_split_values", "0", "1")
    )
    assert sorted(zip(raw["validation"]["speaker"], raw["validation"]["index"], strict=True)) == [
        (s, i) for s in ("ann", "bob", "cat") for i in (0, 1)
    ]
    assert list(zip(raw["train"]["speaker"], raw["train"]["index"], strict=True)) == [(s, i) for s, i in rows if i >= 2]

    by_speaker = common.load_raw_datasets(
        parse(*options, "--validation_split_column", "speaker", "--validation_split_values", "bob")
    )
    assert set(by_speaker["validation"]["speaker"]) == {"bob"} and "bob" not in by_speaker["train"]["speaker"]
    assert (len(by_speaker["train"]), len(by_speaker["validation"])) == (10, 5)


def test_group_hold_out_rejects_what_it_cannot_split() -> None:
    train = Dataset.from_dict({"speaker": ["ann", "ann", "bob"], "index": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"--validation_split_column 'recording' is not a column .*speaker, index"):
        common.hold_out_groups(train, "recording", ["0"])
    with pytest.raises(
        ValueError, match=r"--validation_split_values 7 select no training row of column 'index' \(its values: 0, 1\)"
    ):
        common.hold_out_groups(train, "index", ["7"])
    with pytest.raises(ValueError, match=r"--validation_split_values 0 1 select every training row"):
        common.hold_out_groups(train, "index", ["0", "1"])
    with_validation = DatasetDict({"train": train, "validation": train})
    with pytest.raises(ValueError, match="but the data has a validation split"):
        common.split_and_limit(
            with_validation, parse("--validation_split_column", "index", "--validation_split_values", "0")
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validation_split_column", "index"], "go together, got column 'index' and values None"),
        (["--validation_split_values", "0"], "go together, got column None and values \\['0'\\]"),
    ],
)
def test_group_hold_out_options_go_together(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert re.search(message, capsys.readouterr().err)


def test_group_hold_out_and_a_validation_file_exclude_each_other(tmp_path: Path, capsys) -> None:
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("text,label\nx,0\n")
    with pytest.raises(SystemExit):
        parse("--train_file", str(tmp_path / "a.csv"), "--validation_file", str(tmp_path / "b.csv"),
              "--validation_split_column", "label", "--validation_split_values", "0")  # fmt: skip
    assert "give either --validation_file or --validation_split_column" in capsys.readouterr().err


def test_default_data_files_are_used_without_options() -> None:
    default = {
        "train": [str(EXAMPLES_DIR / "data" / "imdb_unsupervised.parquet")],
        "validation": str(EXAMPLES_DIR / "data" / "imdb_test.parquet"),
    }
    raw = common.load_raw_datasets(parse(), default_data_files=default)
    assert (len(raw["train"]), len(raw["validation"])) == (200, 200)


def test_a_missing_training_column_names_the_option_and_the_columns() -> None:
    raw = DatasetDict({"train": Dataset.from_dict({"review": ["a"], "label": [0]})})
    common.check_training_column(raw, "--text_column", "review")
    message = r"--text_column 'text' is not a column of the training data \(columns: review, label\)"
    with pytest.raises(ValueError, match=message):
        common.check_training_column(raw, "--text_column", "text")


def test_train_and_validation_loaders_follow_the_batch_size_options() -> None:
    splits = DatasetDict({split: Dataset.from_dict({"x": list(range(10))}) for split in ("train", "validation")})
    args = parse("--batch_size", "4", "--eval_batch_size", "3", "--seed", "5")

    def collate(features: list[dict]) -> list[int]:
        return [f["x"] for f in features]

    train_loader, eval_loader = common.build_dataloaders(splits, args, collate)
    train_batches, eval_batches = list(train_loader), list(eval_loader)
    assert [len(b) for b in train_batches] == [4, 4, 2] and [len(b) for b in eval_batches] == [3, 3, 3, 1]
    assert sum(eval_batches, []) == list(range(10))  # validation: in order
    order = sum(train_batches, [])
    assert sorted(order) == list(range(10)) and order != list(range(10))  # training: shuffled
    assert sum(common.build_dataloaders(splits, args, collate)[0], []) == order  # by --seed alone

    _, eval_loader = common.build_dataloaders(splits, args, collate, eval_collator=lambda features: "eval")
    assert next(iter(eval_loader)) == "eval"


# ------------------------------------------------------------------------------------------- model options


def test_layout_options_become_real_config_fields() -> None:
    from perceiver_hf import PerceiverConfig

    parser = common.build_parser("test")
    common.add_layout_arguments(parser.add_argument_group("model"))
    parser.set_defaults(num_layers=3)  # how a script picks its own layout
    config = common.layout_config(common.parse_args(parser, ["--widening_factor", "2"]))
    assert config["num_cross_attention_layers"] == config["num_self_attention_blocks"] == 3
    assert config["cross_attention_widening_factor"] == config["decoder_widening_factor"] == 2
    assert not config["first_cross_attention_layer_shared"] and not config["first_self_attention_block_shared"]
    assert set(config) <= set(inspect.signature(PerceiverConfig.__init__).parameters)  # no typo lands in **kwargs


def test_label_config_maps_ids_and_names_both_ways() -> None:
    from perceiver_hf import PerceiverConfig

    config = PerceiverConfig(**common.label_config(["neg", "pos"]))
    assert (config.num_labels, config.id2label, config.label2id) == (2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1})
    assert config.problem_type == "single_label_classification"


# ------------------------------------------------------------------------------------------- collator


def random_collator(features: list[dict]) -> torch.Tensor:
    return torch.rand(len(features))  # stands in for MLM masking: draws from the global RNG


def test_batch_seeded_collator_depends_only_on_seed_epoch_and_batch_index() -> None:
    collator = common.BatchSeededCollator(random_collator, seed=1)
    features = [{}] * 3
    global_state = torch.get_rng_state()
    first = [collator(features) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is left untouched

    collator.set_epoch(0, start_batch=2)  # a resumed run that skipped two batches
    assert torch.equal(collator(features), first[2])
    collator.set_epoch(1)
    assert not torch.equal(collator(features), first[0])  # a new epoch masks differently


# ------------------------------------------------------------------------------------------- optimizer, schedule


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.position = nn.Parameter(torch.zeros(3, 4))
        self.norm = nn.LayerNorm(4)
        self.linear = nn.Linear(4, 10)
        self.linear.weight = self.embedding.weight  # tied, as in a masked LM


def test_weight_decay_only_on_untied_linear_weights() -> None:
    model = TinyModel()
    model.head = nn.Linear(4, 2)
    optimizer = common.build_optimizer(model, parse("--weight_decay", "0.1"))
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [model.head.weight.shape]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_optimizer_is_fused_and_steps_as_the_loop_does() -> None:
    """The fused AdamW kernel (faster on the CPU) updates the weights as the per-tensor implementation does."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = common.build_optimizer(models[0], parse("--weight_decay", "0.1"))
    assert fused.defaults["fused"]
    names = {id(p): name for name, p in models[0].named_parameters()}
    twins = dict(models[1].named_parameters())
    groups = [
        {"params": [twins[names[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
        for group in fused.param_groups
    ]
    plain = torch.optim.AdamW(groups, lr=fused.defaults["lr"], foreach=False)
    assert not any(group["fused"] for group in plain.param_groups)
    x = torch.randn(5, 4)
    for model, optimizer in zip(models, (fused, plain), strict=True):
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("scheduler", common.SCHEDULERS)
def test_every_scheduler_runs_the_whole_training(scheduler: str) -> None:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    lr_scheduler = common.build_scheduler(optimizer, parse("--lr_scheduler", scheduler), max_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_scheduler.step()  # OneCycleLR raises if stepped past its total
    assert max(rates) == pytest.approx(1e-3)
    if scheduler != "constant":
        assert rates[-1] < 1e-3


def test_training_length_counts_the_partial_accumulation_step() -> None:
    length = common.compute_training_length(parse("--max_epochs", "2", "--gradient_accumulation_steps", "2"), 5)
    assert (length.steps_per_epoch, length.max_steps, length.num_epochs) == (3, 6, 2)
    length = common.compute_training_length(parse("--max_steps", "7"), 5)
    assert (length.max_steps, length.num_epochs) == (7, 2)


def test_prepare_training_sizes_the_run_on_the_prepared_loader(accelerator: Accelerator) -> None:
    args = parse("--max_epochs", "2", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear")
    model = TinyModel()
    train_loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2)  # 5 batches: 3 steps per epoch
    eval_loaders = {name: torch.utils.data.DataLoader(list(range(4)), batch_size=2) for name in ("b", "a")}
    prepared = common.prepare_training(accelerator, args, model, train_loader, eval_loaders)

    assert (prepared.length.steps_per_epoch, prepared.length.max_steps) == (3, 6)
    assert list(prepared.eval_dataloaders) == ["b", "a"]
    # Checkpoints store the loaders' states in this order: training first, then evaluation, as given.
    assert accelerator._dataloaders == [prepared.train_dataloader, *prepared.eval_dataloaders.values()]
    assert [g["weight_decay"] for g in prepared.optimizer.param_groups] == [0.0]  # TinyModel: tied weights only
    rates = []
    for _ in range(6):
        prepared.optimizer.step()
        prepared.scheduler.step()
        rates.append(prepared.optimizer.param_groups[0]["lr"])
    assert rates[-1] == 0.0  # the linear schedule ends exactly at the last step


class FixedLogits(nn.Module):
    """A classifier whose logits are its input: the accuracy of a batch is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> SequenceClassifierOutput:
        logits = logits * self.scale
        loss = nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_accuracy_evaluator_counts_examples_and_skips_ignored_tokens(accelerator: Accelerator) -> None:
    eye = torch.eye(3)
    per_example = [{"logits": eye[i], "labels": torch.tensor(label)} for i, label in enumerate([0, 1, 0])]
    loader = torch.utils.data.DataLoader(per_example, batch_size=2)
    results = common.accuracy_evaluator(accelerator, FixedLogits(), loader)(step=7)
    assert set(results) == {"loss", "accuracy"} and results["accuracy"] == pytest.approx(2 / 3)

    # Per-token labels, as in a masked LM: the -100 positions are not predictions.
    per_token = [{"logits": eye, "labels": torch.tensor([0, -100, 1])}]
    results = common.accuracy_evaluator(accelerator, FixedLogits(), torch.utils.data.DataLoader(per_token))()
    assert results["accuracy"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("main_process", [True, False])
def test_finish_run_writes_eval_results_on_the_main_process_only(
    tmp_path: Path, accelerator: Accelerator, monkeypatch, main_process: bool
) -> None:
    ended = []
    monkeypatch.setattr(type(accelerator), "is_main_process", property(lambda self: main_process))
    monkeypatch.setattr(accelerator, "end_training", lambda: ended.append(True))
    results = {"image+audio": {"loss": 0.5, "accuracy": 0.75}, "image_only": {"loss": 1.0, "accuracy": 0.5}}
    common.finish_run(accelerator, parse("--output_dir", str(tmp_path)), results, hub_repo_id=None)

    path = tmp_path / "eval_results.json"
    if main_process:
        assert path.read_text() == json.dumps(results, indent=2) + "\n"
        assert json.loads(path.read_text()) == results
    else:
        assert not path.exists()
    assert ended == [True]  # every process ends the run (trackers, process group)


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_latest(tmp_path: Path, accelerator: Accelerator) -> None:
    model = accelerator.prepare(nn.Linear(2, 2))
    for step in (3, 12):
        common.save_checkpoint(accelerator, tmp_path, step)
    (tmp_path / "checkpoints" / ".partial_step_20").mkdir()  # a save killed midway is never "latest"
    latest = common.find_checkpoint("latest", tmp_path)
    assert latest == tmp_path / "checkpoints" / "step_12"
    assert common.find_checkpoint(None, tmp_path) is None
    assert common.find_checkpoint("latest", tmp_path / "empty") is None

    with torch.no_grad():
        saved = model.weight.clone()
        model.weight.add_(1.0)
    resume = common.load_checkpoint(accelerator, latest, steps_per_epoch=5, gradient_accumulation_steps=2)
    assert torch.equal(model.weight, saved)
    assert (resume.completed_steps, resume.epoch, resume.batches_to_skip) == (12, 2, 4)


def test_saved_tokenizer_does_not_depend_on_its_last_call(accelerator, wordpiece_tokenizer, tmp_path: Path) -> None:
    """tokenizer.json must not record the truncation/padding of the last call (a `datasets.map` cache hit
    skips that call, so the saved file would differ between two identical runs)."""
    from perceiver_tester import tiny_text_config

    from perceiver_hf import PerceiverForMaskedLM

    model = PerceiverForMaskedLM(tiny_text_config(vocab_size=wordpiece_tokenizer.vocab_size))
    wordpiece_tokenizer(["a long enough review text", "short"], truncation=True, max_length=4, padding=True)
    common.save_model(accelerator, model, tmp_path / "called", wordpiece_tokenizer)
    saved = json.loads((tmp_path / "called" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "called")
    texts = ["a long enough review text to be cut", "short"]
    assert reloaded(texts)["input_ids"] == wordpiece_tokenizer(texts)["input_ids"]
    assert len(reloaded(texts, truncation=True, max_length=5)["input_ids"][0]) == 5
