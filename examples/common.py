"""Training plumbing shared by every example script (masked LM, text, image, audio, multimodal).

A script keeps one linear ``main()`` and calls these helpers in this order:

1. `build_parser` (+ its own argument group) and `parse_args`: the shared command-line options. A script
   that builds a classifier from scratch adds the layout options with `add_layout_arguments`.
2. `setup_accelerator`: Accelerate, TensorBoard logging, seeding, output folder.
3. `load_raw_datasets`: a Hub dataset, local files, or the script's shipped sample; `check_training_column`
   and `encode_labels` check the columns and number the classes. The model's config then takes
   ``**layout_config(args)`` and ``**label_config(class_names)``.
4. `BatchSeededCollator` and `build_dataloaders` (or `build_dataloader`): batches whose randomness
   (shuffling, masking) depends only on the seed, the epoch and the batch index, which makes resumed
   runs exact.
5. `prepare_training`: AdamW (`build_optimizer`), ``accelerator.prepare``, the run's length
   (`compute_training_length`) and the LR schedule (`build_scheduler`), in the one order that works.
6. `find_checkpoint` and `train`: the training loop with gradient accumulation, logging, a progress
   bar, periodic evaluation (`accuracy_evaluator`, or `evaluate_model` with a `load_metric` metric) and
   checkpoints (`save_checkpoint`), resuming from a checkpoint where asked.
7. `save_model`, then `finish_run`: ``eval_results.json``, `push_to_hub` (to the repository made at the
   start by `create_hub_repo`) and the end of the TensorBoard logs.

Every helper takes the parsed `args` or plain values, so a new script reuses them without copying.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from datasets import ClassLabel, DatasetDict, load_dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = [
    "BatchSeededCollator",
    "EXAMPLES_DIR",
    "PreparedTraining",
    "ResumePoint",
    "TrainingLength",
    "accuracy_evaluator",
    "add_layout_arguments",
    "build_dataloader",
    "build_dataloaders",
    "build_optimizer",
    "build_parser",
    "build_scheduler",
    "check_checkpoint_files",
    "check_pretrained",
    "check_training_column",
    "compute_training_length",
    "create_hub_repo",
    "encode_labels",
    "evaluate_model",
    "find_checkpoint",
    "finish_run",
    "hold_out_groups",
    "label_config",
    "layout_config",
    "load_checkpoint",
    "load_metric",
    "load_raw_datasets",
    "parse_args",
    "prepare_training",
    "push_to_hub",
    "save_checkpoint",
    "save_model",
    "setup_accelerator",
    "split_and_limit",
    "train",
]

logger = get_logger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent
"""The folder of the example scripts: shipped data in ``data/``, offline metrics in ``metrics/``."""

SCHEDULERS = ("onecycle", "constant", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
# File extension -> `datasets` builder name for local data files.
DATA_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
CHECKPOINTS_SUBDIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
_PROGRESS_FILE = "training_progress.json"


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error message)."""
    number = _parse_number(value, int)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    number = _parse_number(value, int)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a float > 0."""
    number = _parse_number(value, float)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    """argparse type: a float >= 0."""
    number = _parse_number(value, float)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def probability(value: str) -> float:
    """argparse type: a float in [0, 1)."""
    number = _parse_number(value, float)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {value!r}")
    return number


def _parse_number(value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's option group called `title` (``build_parser``'s "data", "training" or "run"), made if
    missing: a script's own data options then show under the shared "data" heading of ``--help``."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def build_parser(description: str) -> argparse.ArgumentParser:
    """Create a parser holding the data, training and run options that every example shares.

    A script adds its own group (``parser.add_argument_group("model")``), its own options to a shared
    group (``argument_group(parser, "data")``) and changes defaults with
    ``parser.set_defaults(...)``; ``-h`` shows every option with its default.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        default=None,
        help="Name of a dataset on the Hugging Face Hub (needs Hub access). Without it and without --train_file, "
        "the script's sample data shipped in examples/data is used.",
    )
    data.add_argument("--dataset_config_name", default=None, help="Configuration name of --dataset_name.")
    data.add_argument(
        "--train_file",
        nargs="+",
        default=None,
        help="Local training file(s), all of one type: csv, json, jsonl, parquet or txt (one example per line).",
    )
    data.add_argument(
        "--validation_file",
        nargs="+",
        default=None,
        help="Local validation file(s), same types as --train_file. Without it, --validation_split_percentage "
        "of the training data is held out.",
    )
    data.add_argument(
        "--validation_split_percentage",
        type=positive_int,
        default=5,
        help="Percentage of the training data held out for validation when the data has no validation split.",
    )
    data.add_argument(
        "--validation_split_column",
        default=None,
        help="Hold out whole groups instead of a random percentage: the training rows whose value in this column "
        "is one of --validation_split_values become the validation split (e.g. a speaker, or FSDD's recording "
        "'index', so that validation, like a test split, holds recordings the model never heard).",
    )
    data.add_argument(
        "--validation_split_values",
        nargs="+",
        default=None,
        help="The --validation_split_column values held out, compared as text (e.g. 5 6 7 8 9, or theo).",
    )
    data.add_argument("--text_column", default="text", help="Column holding the input text.")
    data.add_argument("--label_column", default="label", help="Column holding the label (classification tasks).")
    data.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Train on a random subset of this many examples (for quick runs).",
    )
    data.add_argument(
        "--max_eval_samples",
        type=positive_int,
        default=None,
        help="Evaluate on a random subset of this many examples (for quick runs).",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--learning_rate", type=positive_float, default=1e-3, help="Peak learning rate of AdamW.")
    training.add_argument(
        "--weight_decay",
        type=non_negative_float,
        default=0.01,
        help="AdamW weight decay, applied to the weight matrices of linear and convolutional layers only "
        "(not to biases, norms, embeddings, position encodings or latent arrays).",
    )
    training.add_argument("--batch_size", type=positive_int, default=32, help="Batch size per device.")
    training.add_argument(
        "--eval_batch_size",
        type=positive_int,
        default=None,
        help="Evaluation batch size; None means --batch_size (default: %(default)s).",
    )
    training.add_argument(
        "--max_steps",
        type=positive_int,
        default=None,
        help="Number of optimizer steps to train for; overrides --max_epochs when given.",
    )
    training.add_argument(
        "--max_epochs",
        type=positive_int,
        default=3,
        help="Number of epochs, used when --max_steps is not given.",
    )
    training.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=1,
        help="Batches accumulated per optimizer step (the effective batch is this times --batch_size).",
    )
    training.add_argument(
        "--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping; 0 disables."
    )
    training.add_argument(
        "--lr_scheduler", choices=SCHEDULERS, default="onecycle", help="Learning-rate schedule after warm-up."
    )
    training.add_argument(
        "--warmup_steps",
        type=non_negative_int,
        default=None,
        help="Linear warm-up steps; None means 0 for constant/linear/cosine and 10%% of the training steps "
        "for onecycle, whose rising phase it is (default: %(default)s).",
    )
    training.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION,
        default="no",
        help="Mixed precision (autocast). bf16 is the usual choice on recent GPUs and CPUs; fp16 adds loss scaling.",
    )
    training.add_argument("--seed", type=int, default=42, help="Random seed (model init, shuffling, masking, dropout).")
    training.add_argument("--dropout", type=probability, default=0.1, help="Dropout probability of the model.")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output_dir",
        default="outputs",
        help="Where the final model, checkpoints (checkpoints/step_N) and TensorBoard logs (runs/) go.",
    )
    run.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=None,
        help="Save a resumable checkpoint every N optimizer steps; None means never (default: %(default)s).",
    )
    run.add_argument(
        "--eval_steps",
        type=positive_int,
        default=None,
        help="Evaluate every N optimizer steps; None means at the end of each epoch. There is always a final "
        "evaluation (default: %(default)s).",
    )
    run.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='Continue a run from a checkpoint folder, or "latest" for the newest in <output_dir>/checkpoints '
        "(starts from scratch if there is none). Give the same options as the original run.",
    )
    run.add_argument("--logging_steps", type=positive_int, default=10, help="Log the training loss every N steps.")
    run.add_argument(
        "--loss_log_file",
        default=None,
        help='Also append each logged training loss to this JSON-lines file ({"step", "loss", "learning_rate"} '
        "per line, main process), e.g. to compare two runs step by step with --logging_steps 1.",
    )
    run.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the final model to the Hugging Face Hub (needs Hub access).",
    )
    run.add_argument(
        "--hub_model_id",
        default=None,
        help="Hub repository for --push_to_hub, as 'user/name' or 'name'; None means the name of --output_dir "
        "(default: %(default)s).",
    )
    run.add_argument(
        "--hub_token",
        default=None,
        help="Hub token for --push_to_hub; None means the token saved by `hf auth login` (default: %(default)s).",
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` and check the options that depend on each other; errors name the option and its value."""
    args = parser.parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size

    if args.dataset_name is not None and args.train_file is not None:
        parser.error(f"give either --dataset_name ({args.dataset_name!r}) or --train_file, not both")
    if args.validation_file is not None and args.train_file is None:
        parser.error("--validation_file needs --train_file")
    if not args.validation_split_percentage < 100:
        parser.error(f"argument --validation_split_percentage: must be < 100, got {args.validation_split_percentage}")
    if (args.validation_split_column is None) != (args.validation_split_values is None):
        parser.error(
            "--validation_split_column and --validation_split_values go together, got "
            f"column {args.validation_split_column!r} and values {args.validation_split_values!r}"
        )
    if args.validation_split_column is not None and args.validation_file is not None:
        parser.error("give either --validation_file or --validation_split_column, not both")
    for option in ("train_file", "validation_file"):
        for path in getattr(args, option) or []:
            _check_data_file(parser, option, path)
        extensions = sorted({Path(path).suffix.lower() for path in getattr(args, option) or []})
        if len(extensions) > 1:
            parser.error(f"argument --{option}: the files must all be of one type, got {', '.join(extensions)}")

    if args.lr_scheduler == "onecycle" and args.warmup_steps is not None and args.warmup_steps < 2:
        parser.error(f"argument --warmup_steps: onecycle needs a rising phase of >= 2 steps, got {args.warmup_steps}")
    if args.max_steps is not None and args.warmup_steps is not None and args.warmup_steps >= args.max_steps:
        parser.error(f"argument --warmup_steps: must be < --max_steps ({args.max_steps}), got {args.warmup_steps}")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(
            f"argument --resume_from_checkpoint: no checkpoint folder at {args.resume_from_checkpoint!r} "
            '(give a checkpoints/step_N folder or "latest")'
        )
    if (args.hub_model_id is not None or args.hub_token is not None) and not args.push_to_hub:
        parser.error("--hub_model_id and --hub_token only apply with --push_to_hub")
    return args


def _check_data_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    extension = Path(path).suffix.lstrip(".").lower()
    if extension not in DATA_BUILDERS:
        parser.error(
            f"argument --{option}: {path!r} has extension {extension!r}; expected one of {', '.join(DATA_BUILDERS)}"
        )
    if not Path(path).is_file():
        parser.error(f"argument --{option}: file {path!r} does not exist")


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_pretrained(
    model_option: str,
    model_source: str,
    *,
    tokenizer_option: str | None = None,
    tokenizer_source: str | None = None,
    max_seq_len: int | None = None,
) -> None:
    """Check a saved model (and its tokenizer) before any work or write; raise a `ValueError` naming the option.

    A local folder must hold ``config.json`` and weights; the tokenizer's ids must all fit the model's
    vocabulary (a larger tokenizer would fail deep inside the embedding, after the data was tokenized);
    `max_seq_len` must fit the model's positions. Only the small config and tokenizer files are read, so
    scripts call this before the accelerator creates the output folder. A value that is not a local path
    is taken for a Hub id and checked by loading its config.
    """
    source = Path(model_source).expanduser()
    looks_local = (
        source.exists()
        or source.is_absolute()
        or model_source.startswith((".", "~"))
        or (
            model_source.count("/") > 1  # Hub ids are "name" or "user/name"
        )
    )
    if looks_local:
        if not source.is_dir():
            raise ValueError(f"{model_option} {model_source!r}: no such folder (expected a folder saved by a script)")
        if not (source / "config.json").is_file():
            raise ValueError(f"{model_option} {model_source!r}: the folder has no config.json (not a saved model)")
        if not any((source / name).is_file() for name in _WEIGHT_FILES):
            raise ValueError(
                f"{model_option} {model_source!r}: the folder has no weights "
                f"(expected one of {', '.join(_WEIGHT_FILES)})"
            )
    config = transformers.AutoConfig.from_pretrained(model_source)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_seq_len is not None and max_positions is not None and max_seq_len > max_positions:
        raise ValueError(
            f"--max_seq_len ({max_seq_len}) exceeds the max_position_embeddings ({max_positions}) of {model_option} "
            f"{model_source!r}: expected at most {max_positions}"
        )
    vocab_size = getattr(config, "vocab_size", None)
    if tokenizer_source is not None and vocab_size is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source)
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"{tokenizer_option} {tokenizer_source!r} has {len(tokenizer)} tokens, but {model_option} "
                f"{model_source!r} embeds only vocab_size={vocab_size}: expected a tokenizer of at most {vocab_size} "
                "tokens (the model's own)"
            )


# ----------------------------------------------------------------------------------------------------------
# Classifiers built from scratch: layout options and labels
# ----------------------------------------------------------------------------------------------------------


def add_layout_arguments(group: argparse._ArgumentGroup) -> None:
    """Add the options of the original Perceiver layout to a script's model `group`.

    The layout: ``--num_layers`` cross-attention layers, each followed by a block of
    ``--num_self_attention_layers_per_block`` self-attention layers; layer and block 1 have their own weights,
    layers and blocks 2.. share one set. `layout_config` turns the options into `PerceiverConfig` fields. The
    defaults here are placeholders: each script sets its own with ``parser.set_defaults`` (``-h`` shows them).
    """
    group.add_argument("--num_latents", type=positive_int, default=32, help="Number of latent vectors.")
    group.add_argument("--d_latents", type=positive_int, default=128, help="Width of the latent vectors.")
    group.add_argument(
        "--num_layers",
        type=positive_int,
        default=1,
        help="Cross-attention layers, each followed by a self-attention block; layer/block 1 has its own weights, "
        "layers/blocks 2.. share one set (the original Perceiver).",
    )
    group.add_argument(
        "--num_self_attention_layers_per_block", type=positive_int, default=4, help="Self-attention layers per block."
    )
    group.add_argument(
        "--num_cross_attention_heads", type=positive_int, default=4, help="Encoder cross-attention heads."
    )
    group.add_argument("--num_self_attention_heads", type=positive_int, default=4, help="Self-attention heads.")
    group.add_argument("--num_decoder_heads", type=positive_int, default=1, help="Decoder cross-attention heads.")
    group.add_argument(
        "--widening_factor", type=positive_int, default=1, help="MLP width as a multiple of the layer width."
    )


def layout_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `PerceiverConfig` fields of the options added by `add_layout_arguments` (pass as ``**layout_config``)."""
    return {
        "num_latents": args.num_latents,
        "d_latents": args.d_latents,
        "num_cross_attention_layers": args.num_layers,
        "num_self_attention_blocks": args.num_layers,
        "num_self_attention_layers_per_block": args.num_self_attention_layers_per_block,
        "first_cross_attention_layer_shared": False,
        "first_self_attention_block_shared": False,
        "num_cross_attention_heads": args.num_cross_attention_heads,
        "num_self_attention_heads": args.num_self_attention_heads,
        "cross_attention_widening_factor": args.widening_factor,
        "self_attention_widening_factor": args.widening_factor,
        "decoder_widening_factor": args.widening_factor,
        "num_decoder_heads": args.num_decoder_heads,
    }


def label_config(names: Sequence[str]) -> dict[str, Any]:
    """The config fields of a single-label classifier over the class `names` (index = class id), as
    `encode_labels` returns them; pass as ``**label_config(names)`` to a config or to ``from_pretrained``.

    ``id2label`` names the predictions of the pipelines; ``problem_type`` makes the loss a cross-entropy.
    """
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "single_label_classification",
    }


# ----------------------------------------------------------------------------------------------------------
# Accelerator and data
# ----------------------------------------------------------------------------------------------------------


def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """Create the `Accelerator` (mixed precision, gradient accumulation, TensorBoard logging) and seed everything.

    TensorBoard logs go to ``<output_dir>/runs/<date-time>``; the run's options are logged as
    hyper-parameters. Watch them with ``tensorboard --logdir <output_dir>/runs``.
    """
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        project_dir=args.output_dir,
        # A seedable sampler draws each epoch's order from (seed + epoch) alone, so a resumed run
        # sees the same order as the original, whatever happened to the global RNG in between.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    # Only the main process reports progress; the others would print the same lines again.
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)

    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    # TensorBoard only accepts scalars and strings as hyper-parameters.
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    hparams.pop("hub_token", None)  # never write a secret into the logs
    accelerator.init_trackers(f"runs/{datetime.now():%Y-%m-%d_%H-%M-%S}", config=hparams)
    return accelerator


def load_raw_datasets(
    args: argparse.Namespace,
    *,
    default_data_files: Mapping[str, str | Sequence[str]] | None = None,
    hub_splits: Mapping[str, str] | None = None,
) -> DatasetDict:
    """Load the ``train`` and ``validation`` splits from the Hub, local files, or the script's sample.

    Sources, first match wins:

    * ``--dataset_name``: ``load_dataset(name, config)``. `hub_splits` maps our split names to the
      dataset's split expressions, e.g. ``{"train": "train+unsupervised", "validation": "test"}``.
    * ``--train_file`` (and ``--validation_file``): local files, loaded with the builder matching
      their extension (csv, json/jsonl, parquet; txt gives one example per line in a ``text`` column).
    * `default_data_files`: the script's default, e.g. the samples in ``examples/data``.

    Without a validation split, ``--validation_split_percentage`` of ``train`` is held out. Then
    ``--max_train_samples`` / ``--max_eval_samples`` pick random subsets (files are often sorted by class).
    """
    if args.dataset_name is not None:
        if hub_splits is None:
            raw = load_dataset(args.dataset_name, args.dataset_config_name)
        else:
            raw = DatasetDict(
                {
                    ours: load_dataset(args.dataset_name, args.dataset_config_name, split=theirs)
                    for ours, theirs in hub_splits.items()
                }
            )
    else:
        if args.train_file is not None:
            data_files = {"train": args.train_file}
            if args.validation_file is not None:
                data_files["validation"] = args.validation_file
        elif default_data_files is not None:
            data_files = {split: _as_list(files) for split, files in default_data_files.items()}
        else:
            raise ValueError("no data: give --dataset_name or --train_file")
        raw = DatasetDict({split: load_local_files(_as_list(files), split) for split, files in data_files.items()})

    return split_and_limit(raw, args)


def split_and_limit(raw: DatasetDict, args: argparse.Namespace) -> DatasetDict:
    """Hold out a validation split from ``train`` when there is none (the rows of ``--validation_split_values``
    in ``--validation_split_column``, else a random ``--validation_split_percentage``), then apply
    ``--max_train_samples`` / ``--max_eval_samples``. For scripts that load data their own way too (e.g. an
    ``imagefolder``)."""
    if "train" not in raw:
        raise ValueError(f"the data has no 'train' split (splits: {', '.join(raw)})")
    column = args.validation_split_column
    if column is not None:
        if "validation" in raw:
            raise ValueError(f"--validation_split_column {column!r} was given, but the data has a validation split")
        raw = hold_out_groups(raw["train"], column, args.validation_split_values)
    elif "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw = DatasetDict({"train": held_out["train"], "validation": held_out["test"]})

    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    for split, limit in limits.items():
        if limit is not None and limit < len(raw[split]):
            raw[split] = raw[split].shuffle(seed=args.seed).select(range(limit))
    return raw


def hold_out_groups(train: datasets.Dataset, column: str, values: Sequence[str]) -> DatasetDict:
    """Split `train` into ``train`` and ``validation``: the rows whose `column` value, as text, is in `values`
    are the validation split (whole groups, e.g. speakers or recording indices, held out together)."""
    if column not in train.column_names:
        raise ValueError(
            f"--validation_split_column {column!r} is not a column of the training data "
            f"(columns: {', '.join(train.column_names)})"
        )
    held_out_values = set(values)
    in_validation = [str(value) in held_out_values for value in train[column]]
    num_held_out = sum(in_validation)
    if num_held_out in (0, len(train)):
        found = sorted({str(value) for value in train[column]})
        shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
        which = "no" if num_held_out == 0 else "every"
        raise ValueError(
            f"--validation_split_values {' '.join(values)} select {which} training row of column {column!r} "
            f"(its values: {shown}); some rows must be left to train on and some held out"
        )
    validation = [i for i, held in enumerate(in_validation) if held]
    training = [i for i, held in enumerate(in_validation) if not held]
    return DatasetDict({"train": train.select(training), "validation": train.select(validation)})


def check_training_column(raw: DatasetDict, option: str, column: str) -> None:
    """Raise a `ValueError` naming `option` (e.g. ``--text_column``) when the training split has no `column`.

    Called right after loading, so a wrong column name fails before tokenizing or decoding anything.
    """
    columns = raw["train"].column_names
    if column not in columns:
        raise ValueError(f"{option} {column!r} is not a column of the training data (columns: {', '.join(columns)})")


def encode_labels(raw: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """Return the splits with integer class ids in `label_column`, and the class names (index = id).

    A `ClassLabel` column gives its names; integer labels must be 0..K-1 (named "0".."K-1"); string labels
    are numbered in sorted order. Rows labelled -1 (unlabelled, like IMDb's "unsupervised" split) are dropped.
    """
    for split, dataset in raw.items():
        if label_column not in dataset.column_names:
            raise ValueError(
                f"--label_column {label_column!r} is not a column of the {split} data "
                f"(columns: {', '.join(dataset.column_names)})"
            )
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = sorted({v for split in raw.values() for v in split.unique(label_column)} - {-1})
        if all(isinstance(v, str) for v in values):
            names = values
            ids = {name: i for i, name in enumerate(names)}
            raw = raw.map(lambda batch: {label_column: [ids[v] for v in batch[label_column]]}, batched=True)
        elif all(isinstance(v, int) for v in values) and values == list(range(len(values))):
            names = [str(v) for v in values]
        else:
            raise ValueError(
                f"--label_column {label_column!r} must hold class names or class ids 0..K-1, got values {values[:10]}"
            )
    if len(names) < 2:
        raise ValueError(f"--label_column {label_column!r} must hold at least 2 classes, got {names}")
    labelled = raw.filter(lambda batch: [v != -1 for v in batch[label_column]], batched=True)
    return labelled, names


def _as_list(files: str | Sequence[str]) -> list[str]:
    return [files] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


def load_local_files(files: list[str], split: str) -> datasets.Dataset:
    """Load the files of one split with the `datasets` builder matching their (common) extension."""
    extensions = sorted({Path(f).suffix.lstrip(".").lower() for f in files})
    if len(extensions) > 1:
        # Builders type the same column differently (e.g. text: string vs large_string): no safe concatenation.
        raise ValueError(f"the {split} files must all be of one type, got {', '.join(extensions)}: {files}")
    if extensions[0] not in DATA_BUILDERS:
        raise ValueError(f"{split} file type {extensions[0]!r} is not supported; use one of {', '.join(DATA_BUILDERS)}")
    return load_dataset(DATA_BUILDERS[extensions[0]], data_files=files, split="train")


class BatchSeededCollator:
    """Wraps a random collator (e.g. MLM masking) so that each batch's randomness depends only on
    (seed, epoch, batch index).

    Why: Accelerate's data loader collates batch k+1 before step k runs (it looks one batch ahead),
    and a resumed run skips the batches already seen without collating them. A collator drawing
    from the global RNG would therefore mask differently after a resume and shift the dropout
    randomness too. Here each batch is collated under its own seed, in a forked RNG that leaves the
    global one untouched. It also makes evaluation masks identical at every evaluation.

    With several processes, Accelerate deals the batches round-robin: local batch k of process p is
    batch ``k * num_processes + p`` of the single-process order, and is seeded with that global index.
    So the masks do not depend on the number of processes (a 2-process evaluation masks exactly as a
    1-process one), and no two processes share a mask pattern.

    `train` and `evaluate_model` call `set_epoch` and `set_process`. Use it with ``num_workers=0`` (the
    default): worker processes would each hold a copy of the batch counter.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any], seed: int) -> None:
        self.collator = collator
        self.seed = seed
        self.epoch = 0
        self.batch_index = 0
        self.process_index, self.num_processes = 0, 1

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start `epoch` at local batch `start_batch` (the number of batches a resumed run skips)."""
        self.epoch, self.batch_index = epoch, start_batch

    def set_process(self, process_index: int, num_processes: int) -> None:
        """Tell the collator which of `num_processes` data-parallel processes it collates for."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index ({process_index}) must be in [0, num_processes={num_processes})")
        self.process_index, self.num_processes = process_index, num_processes

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        global_index = self.batch_index * self.num_processes + self.process_index
        # SeedSequence mixes the three numbers into a well-spread 32-bit seed.
        seed = int(np.random.SeedSequence([self.seed, self.epoch, global_index]).generate_state(1)[0])
        self.batch_index += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.collator(features)


def group_texts(batch: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate a batch of tokenized texts (``[CLS] text [SEP] [CLS] text [SEP] ...``, every column alike) and
    cut the stream into blocks of `block_size` tokens; the last partial block is dropped, as in transformers'
    ``run_mlm.py``. For ``datasets.Dataset.map(..., batched=True, fn_kwargs={"block_size": ...})``: a map batch's
    remainder is dropped, so blocks never span two map batches."""
    stream = {name: list(itertools.chain.from_iterable(values)) for name, values in batch.items()}
    length = len(stream["input_ids"]) // block_size * block_size
    return {name: [values[i : i + block_size] for i in range(0, length, block_size)] for name, values in stream.items()}


def build_dataloader(
    dataset: datasets.Dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """A `DataLoader` with its own generator.

    Each ``iter(dataloader)`` draws a worker base seed from the loader's generator; without one it
    would draw from the global RNG, and an evaluation (or a resume) would change the dropout
    randomness of the training steps that follow.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def build_dataloaders(
    splits: DatasetDict,
    args: argparse.Namespace,
    train_collator: Callable[[list[dict[str, Any]]], Any],
    eval_collator: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The training loader (``splits["train"]``, shuffled, ``--batch_size``) and the validation loader
    (``splits["validation"]``, in order, ``--eval_batch_size``), both seeded with ``--seed``.

    `eval_collator` defaults to `train_collator`; give another one where training batches are augmented
    or masked differently.
    """
    eval_collator = train_collator if eval_collator is None else eval_collator
    train_dataloader = build_dataloader(splits["train"], train_collator, args.batch_size, shuffle=True, seed=args.seed)
    eval_dataloader = build_dataloader(
        splits["validation"], eval_collator, args.eval_batch_size, shuffle=False, seed=args.seed
    )
    return train_dataloader, eval_dataloader


# ----------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices of linear and convolutional layers only.

    Biases, norm parameters, token embeddings, position encodings, latent arrays and decoder queries
    are left undecayed: decay would pull them towards zero, which is not a sensible prior for them.
    A parameter shared with an embedding (tied output embedding) counts as an embedding.
    """
    decayed: set[int] = set()
    not_decayed: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            is_matrix_weight = name == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            (decayed if is_matrix_weight else not_decayed).add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]  # shared parameters come once
    groups = [
        {
            "params": [p for p in params if id(p) in decayed and id(p) not in not_decayed],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for p in params if id(p) not in decayed or id(p) in not_decayed], "weight_decay": 0.0},
    ]
    # The fused kernel (one pass over all parameters) is 3-4x faster than the per-tensor loop on these CPUs (61
    # tensors of 0.3-5M parameters: 0.09-0.12 s against 0.38-0.40 s per step, measured side by side); it takes
    # floating-point parameters on the CPU or a GPU.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate, fused=fused)


@dataclass(frozen=True)
class TrainingLength:
    """How long a run is, in optimizer steps."""

    max_steps: int  # total optimizer steps
    num_epochs: int  # epochs needed to reach max_steps (the last one may be partial)
    steps_per_epoch: int  # optimizer steps per full epoch


def compute_training_length(args: argparse.Namespace, batches_per_epoch: int) -> TrainingLength:
    """Derive the run length from ``--max_steps`` (or ``--max_epochs``) and the data loader's length.

    `batches_per_epoch` is ``len(train_dataloader)`` after ``accelerator.prepare`` (batches per process).
    An epoch ends with an optimizer step even when its batch count is not a multiple of
    ``--gradient_accumulation_steps`` (Accelerate syncs at the end of the data loader), hence the ceiling.
    """
    if batches_per_epoch == 0:
        raise ValueError("the training data loader is empty: is the training split empty?")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps is not None else args.max_epochs * steps_per_epoch
    return TrainingLength(max_steps, math.ceil(max_steps / steps_per_epoch), steps_per_epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, max_steps: int, num_processes: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule chosen by ``--lr_scheduler``, with ``--warmup_steps`` of linear warm-up.

    ``onecycle`` is `torch.optim.lr_scheduler.OneCycleLR`: the rate rises from lr/25 to lr during the
    warm-up (default: 10% of the steps), then anneals (cosine) down to lr/25/1e4. Momentum cycling is off,
    so AdamW's betas stay as configured. Accelerate steps a prepared scheduler once per process at every
    optimizer step, hence the step counts are multiplied by `num_processes` (as in the transformers examples).
    """
    if args.lr_scheduler == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1): its rising phase needs at least 2 steps.
        warmup = args.warmup_steps if args.warmup_steps is not None else max(2, round(0.1 * max_steps))
        if not 2 <= warmup < max_steps:
            raise ValueError(
                f"--lr_scheduler onecycle needs 2 <= --warmup_steps < {max_steps} (the training steps), got "
                f"{warmup}; for runs this short use --lr_scheduler constant"
            )
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max_steps * num_processes,
            pct_start=warmup / max_steps,
            cycle_momentum=False,
        )
    warmup = args.warmup_steps or 0
    if warmup >= max_steps:
        raise ValueError(f"--warmup_steps ({warmup}) must be smaller than the {max_steps} training steps")
    return transformers.get_scheduler(
        {"constant": "constant_with_warmup"}.get(args.lr_scheduler, args.lr_scheduler),
        optimizer=optimizer,
        num_warmup_steps=warmup * num_processes,
        num_training_steps=max_steps * num_processes,
    )


@dataclass(frozen=True)
class PreparedTraining:
    """What `train` works on: the objects returned by ``accelerator.prepare``, and the run's length."""

    model: nn.Module  # wrapped for the device and processes (``accelerator.unwrap_model`` gives it back)
    optimizer: torch.optim.Optimizer  # AdamW from `build_optimizer`
    scheduler: torch.optim.lr_scheduler.LRScheduler  # from `build_scheduler`
    train_dataloader: DataLoader  # yields this process's share of the training batches
    eval_dataloaders: dict[str, DataLoader]  # the evaluation loaders, by the names they were given
    length: TrainingLength


def prepare_training(
    accelerator: Accelerator,
    args: argparse.Namespace,
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloaders: Mapping[str, DataLoader],
) -> PreparedTraining:
    """Build AdamW for `model`, prepare everything with `accelerator`, size the run and build its LR schedule.

    The order is forced: the optimizer is built from the model's parameters before ``prepare`` wraps the
    model; the run's length (`compute_training_length`) counts the *prepared* training loader, which
    holds one process's share of the batches; the schedule needs that length, so it is prepared last.
    `eval_dataloaders` (e.g. ``{"validation": loader}``) are prepared in the same call, after the
    training loader: a checkpoint stores the loaders' sampler states in that order, so keeping it keeps
    older checkpoints resumable. From here on use the returned objects, not the unprepared ones passed in.
    """
    optimizer = build_optimizer(model, args)
    names = list(eval_dataloaders)
    model, optimizer, train_dataloader, *prepared_eval = accelerator.prepare(
        model, optimizer, train_dataloader, *eval_dataloaders.values()
    )
    length = compute_training_length(args, len(train_dataloader))
    scheduler = accelerator.prepare(build_scheduler(optimizer, args, length.max_steps, accelerator.num_processes))
    return PreparedTraining(
        model, optimizer, scheduler, train_dataloader, dict(zip(names, prepared_eval, strict=True)), length
    )


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: steps already done, the epoch, and the batches of that epoch already used."""

    completed_steps: int = 0
    epoch: int = 0
    batches_to_skip: int = 0


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, processor: Any | None = None
) -> Path:
    """Save everything needed to continue the run to ``<output_dir>/checkpoints/step_<step>``.

    `accelerator.save_state` writes model, optimizer, scheduler, sampler, gradient scaler and RNG states;
    `processor` (tokenizer, image or audio processor) is saved beside them so a resumed run tokenizes
    exactly as the original. The files go to a temporary folder that is renamed at the end, so a run
    killed while saving never leaves a half-written ``step_N`` for ``--resume_from_checkpoint latest``.
    """
    checkpoints = Path(output_dir) / CHECKPOINTS_SUBDIR
    final = checkpoints / f"step_{step}"
    partial = checkpoints / f".partial_step_{step}"  # does not match step_N: never picked as "latest"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left over from a run killed while saving
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
    if accelerator.is_main_process:
        if processor is not None:
            save_processor(processor, partial)
        (partial / _PROGRESS_FILE).write_text(json.dumps({"completed_steps": step}) + "\n")
        if final.exists():  # the same step saved by an earlier run into this output_dir
            shutil.rmtree(final)
        os.replace(partial, final)  # atomic on one file system
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")
    return final


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Resolve ``--resume_from_checkpoint``: None, a checkpoint folder, or "latest" in ``<output_dir>/checkpoints``.

    "latest" with no checkpoint yet returns None (a fresh start), so a job restarted after preemption can
    always pass it.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint folder at {str(path)!r}")
        check_checkpoint_files(path)  # fail now, not after loading the data and building the model
        return path
    checkpoints = Path(output_dir) / CHECKPOINTS_SUBDIR
    found = [p for p in checkpoints.glob("step_*") if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    if not found:
        logger.info(f"No checkpoint in {checkpoints}: starting from scratch")
        return None
    latest = max(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))
    check_checkpoint_files(latest)
    return latest


def check_checkpoint_files(checkpoint: str | os.PathLike, process_index: int = 0) -> None:
    """Raise a `ValueError` naming the file when a checkpoint lacks its weights or its RNG state, or the
    RNG state is unreadable.

    Why: ``accelerator.load_state`` only logs, at info level, that it "could not load random states"
    when that file is missing or damaged, and the resumed run would silently draw other dropout masks.
    The RNG file is read with ``weights_only`` (Accelerate's `load`): plain numbers and arrays, never
    arbitrary pickled objects.
    """
    checkpoint = Path(checkpoint)
    # model.safetensors; FSDP and DeepSpeed save pytorch_model_fsdp*.bin files or a pytorch_model* folder instead.
    if not any(checkpoint.glob("model*")) and not any(checkpoint.glob("pytorch_model*")):
        raise ValueError(f"checkpoint {checkpoint} has no model weights (model.safetensors): it is incomplete")
    rng_file = checkpoint / f"random_states_{process_index}.pkl"
    if not rng_file.is_file():
        raise ValueError(
            f"checkpoint {checkpoint} has no {rng_file.name}: it is incomplete, or was saved by a run with fewer "
            "processes (resume with the same number of processes)"
        )
    try:
        accelerate_load(rng_file)
    except Exception as error:
        raise ValueError(f"checkpoint file {rng_file} is unreadable (truncated or tampered?): {error}") from error


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: str | os.PathLike,
    steps_per_epoch: int,
    gradient_accumulation_steps: int,
) -> ResumePoint:
    """Restore the state saved by `save_checkpoint` and work out where training continues.

    Call it after ``accelerator.prepare``: it restores the prepared objects in place.
    """
    checkpoint = Path(checkpoint)
    progress_file = checkpoint / _PROGRESS_FILE
    if progress_file.is_file():
        completed_steps = int(json.loads(progress_file.read_text())["completed_steps"])
    elif match := _CHECKPOINT_NAME.match(checkpoint.name):
        completed_steps = int(match.group(1))
    else:
        raise ValueError(f"{checkpoint} has no {_PROGRESS_FILE} and is not named step_N: cannot tell its step")
    check_checkpoint_files(checkpoint, accelerator.process_index)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # torch and safetensors errors do not say which checkpoint is damaged
        raise ValueError(
            f"checkpoint {checkpoint} could not be loaded (truncated or tampered file?): {error}"
        ) from error
    # Every optimizer step of a full epoch uses gradient_accumulation_steps batches, except maybe the last.
    epoch, steps_into_epoch = divmod(completed_steps, steps_per_epoch)
    logger.info(f"Resumed from {checkpoint}: step {completed_steps}, epoch {epoch}")
    return ResumePoint(completed_steps, epoch, steps_into_epoch * gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------


def train(
    accelerator: Accelerator,
    args: argparse.Namespace,
    prepared: PreparedTraining,
    *,
    evaluate_fn: Callable[[int], dict[str, float]] | None = None,
    processor: Any | None = None,
    checkpoint: Path | None = None,
) -> dict[str, float]:
    """Run the training loop on the objects of `prepare_training` and return the metrics of the final evaluation.

    Every ``--logging_steps`` the mean training loss and the learning rate go to TensorBoard; every
    ``--eval_steps`` (default: at the end of each epoch) and at the end, ``evaluate_fn(step)`` is called
    and its metrics are logged as ``eval/<name>``; every ``--checkpointing_steps`` a checkpoint is saved
    with `processor`. With `checkpoint`, the run continues from it exactly: same data order, same masks,
    same dropout, as if it had never stopped.
    """
    model, optimizer, scheduler = prepared.model, prepared.optimizer, prepared.scheduler
    train_dataloader, length = prepared.train_dataloader, prepared.length
    start = ResumePoint()
    if checkpoint is not None:
        start = load_checkpoint(accelerator, checkpoint, length.steps_per_epoch, args.gradient_accumulation_steps)

    completed_steps = start.completed_steps
    progress = tqdm(
        total=length.max_steps,
        initial=completed_steps,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    logger.info(
        f"Training for {length.max_steps} steps ({length.num_epochs} epochs of {length.steps_per_epoch} steps), "
        f"batch size {args.batch_size} x {args.gradient_accumulation_steps} accumulation x "
        f"{accelerator.num_processes} processes"
    )
    metrics: dict[str, float] = {}
    evaluated_at = -1
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0

    def run_evaluation() -> dict[str, float]:
        nonlocal evaluated_at
        results = evaluate_fn(completed_steps) if evaluate_fn is not None else {}
        if results:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=completed_steps)
            logger.info(f"step {completed_steps}: " + ", ".join(f"eval_{k} = {v:.4f}" for k, v in results.items()))
        evaluated_at = completed_steps
        model.train()
        return results

    for epoch in range(start.epoch, length.num_epochs):
        model.train()
        skip = start.batches_to_skip if epoch == start.epoch else 0
        # The sampler's order depends on the epoch only; the collator's masks on (epoch, batch index).
        train_dataloader.set_epoch(epoch)
        if isinstance(train_dataloader.collate_fn, BatchSeededCollator):
            train_dataloader.collate_fn.set_epoch(epoch, start_batch=skip)
            train_dataloader.collate_fn.set_process(accelerator.process_index, accelerator.num_processes)
        # Skipping at the sampler level: the batches of this epoch already used are not even loaded.
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader

        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().float()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue  # still accumulating: not an optimizer step yet

            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0:
                # Mean over the batches since the last log, and over processes.
                train_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
                accelerator.log({"train/loss": train_loss, "train/learning_rate": learning_rate}, step=completed_steps)
                progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{learning_rate:.2e}")
                if getattr(args, "loss_log_file", None) and accelerator.is_main_process:
                    with open(args.loss_log_file, "a") as log_file:  # append: a resumed run continues the file
                        record = {"step": completed_steps, "loss": train_loss, "learning_rate": learning_rate}
                        log_file.write(json.dumps(record) + "\n")
                loss_sum.zero_()
                loss_count = 0
            if args.eval_steps is not None and completed_steps % args.eval_steps == 0:
                metrics = run_evaluation()
            if args.checkpointing_steps is not None and completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, completed_steps, processor)
            if completed_steps >= length.max_steps:
                break

        if args.eval_steps is None and evaluated_at != completed_steps:
            metrics = run_evaluation()  # once per epoch by default
        if completed_steps >= length.max_steps:
            break

    progress.close()
    if evaluated_at != completed_steps:
        metrics = run_evaluation()
    return metrics


def evaluate_model(
    accelerator: Accelerator,
    model: nn.Module,
    dataloader: DataLoader,
    *,
    metric: evaluate.EvaluationModule | None = None,
    predictions_fn: Callable[[Mapping[str, torch.Tensor], Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ignore_index: int = -100,
) -> dict[str, float]:
    """Mean loss over the evaluation set, plus `metric` when given.

    The loss of each batch is weighted by its real number of examples (the last batch is usually
    smaller), and `accelerator.gather_for_metrics` drops the duplicates that pad the last batch across
    processes. `predictions_fn(batch, outputs)` returns ``(predictions, references)``, batch first;
    references equal to `ignore_index` (e.g. unmasked tokens in MLM) are left out of the metric.
    The model is left in eval mode.
    """
    if metric is not None and predictions_fn is None:
        raise ValueError("evaluate_model needs predictions_fn to compute a metric")
    model.eval()
    if isinstance(dataloader.collate_fn, BatchSeededCollator):
        dataloader.collate_fn.set_epoch(0)  # the same masks at every evaluation: comparable losses
        dataloader.collate_fn.set_process(accelerator.process_index, accelerator.num_processes)
    loss_sum, num_examples = 0.0, 0
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        batch_size = _batch_size(batch)
        losses = accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(batch_size))
        loss_sum += losses.sum().item()
        num_examples += losses.numel()
        if metric is not None:
            predictions, references = predictions_fn(batch, outputs)
            if references.dim() > 1:  # e.g. per-token labels: lengths may differ between processes
                predictions = accelerator.pad_across_processes(predictions, dim=1, pad_index=0)
                references = accelerator.pad_across_processes(references, dim=1, pad_index=ignore_index)
            predictions, references = accelerator.gather_for_metrics((predictions, references))
            keep = references != ignore_index
            metric.add_batch(predictions=predictions[keep].cpu().numpy(), references=references[keep].cpu().numpy())
    results = {"loss": loss_sum / max(num_examples, 1)}
    if metric is not None:
        results.update(metric.compute())
    return results


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"cannot tell the batch size: no tensor in the batch (keys: {', '.join(batch)})")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of the metric modules shipped in ``examples/metrics`` by path, so no Hub access is needed.

    ``evaluate.load("accuracy")`` fetches its script from the Hub; ``load_metric("accuracy")`` loads
    ``examples/metrics/accuracy/accuracy.py``. The metric keeps its data in memory, so processes never
    share cache files.
    """
    path = EXAMPLES_DIR / "metrics" / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in (EXAMPLES_DIR / "metrics").iterdir() if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(f"no metric {name!r} in {path.parent}; available: {', '.join(available)}")
    return evaluate.load(str(path), keep_in_memory=True)


def accuracy_evaluator(
    accelerator: Accelerator, model: nn.Module, dataloader: DataLoader
) -> Callable[[int | None], dict[str, float]]:
    """An ``evaluate_fn`` for `train`: ``{"loss", "accuracy"}`` of `model` on the prepared `dataloader`.

    The accuracy compares ``outputs.logits.argmax(-1)`` with ``batch["labels"]``: one class per example
    (``(B, K)`` logits, ``(B,)`` labels), or one per token (``(B, L, V)`` and ``(B, L)``, where labels of
    -100, the positions a masked LM does not predict, are left out). The metric is loaded once, here;
    the returned function ignores the step that `train` passes it.
    """
    accuracy = load_metric("accuracy")

    def evaluate_fn(step: int | None = None) -> dict[str, float]:
        return evaluate_model(
            accelerator,
            model,
            dataloader,
            metric=accuracy,
            predictions_fn=lambda batch, outputs: (outputs.logits.argmax(dim=-1), batch["labels"]),
        )

    return evaluate_fn


# ----------------------------------------------------------------------------------------------------------
# Saving and sharing
# ----------------------------------------------------------------------------------------------------------


def save_model(
    accelerator: Accelerator, model: nn.Module, output_dir: str | os.PathLike, processor: Any | None = None
) -> None:
    """``save_pretrained`` of the unwrapped model (safetensors) and of its tokenizer or processor (main process)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process and processor is not None:
        save_processor(processor, output_dir)
    accelerator.wait_for_everyone()
    logger.info(f"Saved the model to {output_dir}")


def save_processor(processor: Any, directory: str | os.PathLike) -> None:
    """``save_pretrained`` of a tokenizer or processor, without the state of its last call.

    A fast tokenizer's Rust backend keeps the truncation and padding of its last call and writes them into
    tokenizer.json, so the saved file would depend on whether ``datasets.map`` tokenized or read its cache.
    transformers sets both on every call anyway, so clearing them changes no behaviour.
    """
    tokenizer = getattr(processor, "tokenizer", processor)  # a multimodal processor holds one
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    processor.save_pretrained(directory)


def create_hub_repo(accelerator: Accelerator, args: argparse.Namespace) -> str | None:
    """With ``--push_to_hub``, create (or reuse) the Hub repository at the start, so a bad token or name
    fails before training rather than after. Returns the repository id, or None without the flag."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    from huggingface_hub import HfApi

    repo_name = args.hub_model_id or Path(args.output_dir).absolute().name
    return HfApi(token=args.hub_token).create_repo(repo_name, exist_ok=True).repo_id


def push_to_hub(
    accelerator: Accelerator,
    args: argparse.Namespace,
    repo_id: str | None,
    commit_message: str = "End of training",
    ignore_patterns: Iterable[str] = (f"{CHECKPOINTS_SUBDIR}/*", "runs/*"),
) -> None:
    """Upload ``--output_dir`` (without checkpoints and logs) to `repo_id`, on the main process; no-op
    without ``--push_to_hub``."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return
    from huggingface_hub import HfApi

    HfApi(token=args.hub_token).upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        repo_type="model",
        ignore_patterns=list(ignore_patterns),
    )
    logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")


def finish_run(
    accelerator: Accelerator, args: argparse.Namespace, results: Mapping[str, Any], hub_repo_id: str | None
) -> None:
    """End a run whose model is saved: write `results` to ``<output_dir>/eval_results.json``, upload
    ``--output_dir`` with ``--push_to_hub``, and close the TensorBoard logs.

    `results` is what the script reports, usually `train`'s final metrics (``{"loss": ..., "accuracy":
    ...}``) or one such dict per evaluation condition. Only the main process writes and uploads, but every
    process calls this: ``end_training`` also ends the process group of a distributed run.
    """
    if accelerator.is_main_process:
        (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    push_to_hub(accelerator, args, hub_repo_id)
    accelerator.end_training()
