"""Unit tests of the shared example plumbing in `examples/common.py` and the offline accuracy metric.

End-to-end runs of the scripts (kill and resume, bad options) are in `test_robustness.py`; these tests
check the helpers one by one, in well under a second each.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

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


def test_default_data_files_are_used_without_options() -> None:
    default = {
        "train": [str(EXAMPLES_DIR / "data" / "imdb_unsupervised.parquet")],
        "validation": str(EXAMPLES_DIR / "data" / "imdb_test.parquet"),
    }
    raw = common.load_raw_datasets(parse(), default_data_files=default)
    assert (len(raw["train"]), len(raw["validation"])) == (200, 200)


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
