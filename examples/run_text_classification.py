"""Fine-tune a Perceiver IO text classifier with Accelerate: the original two-stage recipe (IMDb sentiment).

Stage 1 trains a new classification decoder on a frozen encoder taken from a masked-LM run of
``run_mlm.py``; the tokenizer comes from the same folder:

    python examples/run_text_classification.py --mlm_checkpoint outputs/mlm --freeze_encoder \\
        --output_dir outputs/clf-stage1

Stage 2 unfreezes the encoder and fine-tunes the whole model from stage 1's output, with a lower
learning rate:

    python examples/run_text_classification.py --clf_checkpoint outputs/clf-stage1 --learning_rate 1e-4 \\
        --output_dir outputs/clf-stage2

With no data option the script trains on the IMDb sample shipped in ``examples/data`` (train: 500
reviews, validation: 200); ``--train_file`` / ``--validation_file`` take local files (for the full
IMDb data: ``../shared/data/imdb/train.parquet`` and ``test.parquet``) and ``--dataset_name imdb`` the
Hub dataset. Validation accuracy goes through ``evaluate`` with the metric module shipped in
``examples/metrics`` (no Hub access needed). The final model and tokenizer are saved with
``save_pretrained``, so ``pipeline("sentiment-analysis", model=<output_dir>)`` loads them. Watch the run
with ``tensorboard --logdir <output_dir>/runs``; ``--checkpointing_steps`` and
``--resume_from_checkpoint`` let a run stop and continue exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common import (
    EXAMPLES_DIR,
    accuracy_evaluator,
    build_dataloader,
    build_dataloaders,
    build_parser,
    check_pretrained,
    check_training_column,
    create_hub_repo,
    encode_labels,
    find_checkpoint,
    finish_run,
    label_config,
    load_local_files,
    load_raw_datasets,
    parse_args,
    positive_int,
    prepare_training,
    save_model,
    setup_accelerator,
    train,
)
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase, pipeline

# Importing perceiver_hf registers the perceiver_io model type with the Auto classes (and the pipelines).
from perceiver_hf import PerceiverForSequenceClassification

SAMPLE_DIR = EXAMPLES_DIR / "data"
# Default data: the shipped IMDb sample; train on train, validate on test.
SAMPLE_DATA_FILES = {
    "train": [str(SAMPLE_DIR / "imdb_train.parquet")],
    "validation": [str(SAMPLE_DIR / "imdb_test.parquet")],
}
# The same splits of the Hub's "imdb" dataset (its "unsupervised" split has no labels).
HUB_SPLITS = {"train": "train", "validation": "test"}
DEFAULT_PREDICT_SAMPLES = [
    "I loved this movie: the story is moving and the actors are brilliant.",
    "A boring, badly written film. I want my two hours back.",
]


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])

    model = parser.add_argument_group("model (give exactly one of --mlm_checkpoint and --clf_checkpoint)")
    model.add_argument(
        "--mlm_checkpoint",
        default=None,
        help="Stage 1: a folder saved by run_mlm.py (or a Hub id) holding a masked LM and its tokenizer. Its "
        "text adapter and encoder are kept; the classification decoder is new.",
    )
    model.add_argument(
        "--clf_checkpoint",
        default=None,
        help="Stage 2: a folder saved by this script (or a Hub id), e.g. stage 1's --output_dir; the whole "
        "classifier and its tokenizer are loaded.",
    )
    model.add_argument(
        "--freeze_encoder",
        action="store_true",
        help="Train only the classification decoder: the text adapter and encoder stay exactly as loaded. "
        "Without it every weight is trained (a checkpoint's own freeze setting is overridden).",
    )
    model.add_argument(
        "--max_seq_len",
        type=positive_int,
        default=None,
        help="Texts are truncated to this many tokens (incl. [CLS]/[SEP]); at most, and by default, the model's "
        "max_position_embeddings. Saved as the tokenizer's model_max_length.",
    )
    model.add_argument(
        "--test_file",
        nargs="+",
        default=None,
        help="Local file(s) of a test split (same types and columns as --train_file), evaluated once, with the final "
        "weights, after training: test_loss and test_accuracy in eval_results.json. Nothing during training looks "
        "at it; choices are made on the validation split.",
    )
    parser.add_argument(
        "--predict_samples",
        nargs="+",
        default=DEFAULT_PREDICT_SAMPLES,
        help="Texts that the saved model classifies at the end, through pipeline('sentiment-analysis').",
    )

    # The original recipe's settings (dropout 0, weight decay 1e-3, learning rate 1e-3); the epoch count
    # suits the shipped sample. The stage-2 learning rate is given on the command line (e.g. 1e-4).
    parser.set_defaults(
        output_dir="outputs/text-classification",
        batch_size=32,
        learning_rate=1e-3,
        weight_decay=1e-3,
        dropout=0.0,
        max_epochs=3,
        logging_steps=5,
    )
    args = parse_args(parser, argv)

    if (args.mlm_checkpoint is None) == (args.clf_checkpoint is None):
        parser.error(
            "give exactly one of --mlm_checkpoint (stage 1: start from a masked LM) and --clf_checkpoint "
            f"(stage 2: continue a classifier), got mlm_checkpoint={args.mlm_checkpoint!r}, "
            f"clf_checkpoint={args.clf_checkpoint!r}"
        )
    if args.max_seq_len is not None and args.max_seq_len < 3:
        parser.error(f"argument --max_seq_len: must be >= 3 ([CLS], a token, [SEP]), got {args.max_seq_len}")
    return args


def tokenizer_for(args: argparse.Namespace, checkpoint: Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer of the resumed checkpoint, else the one saved beside the model that training starts from."""
    source = checkpoint or args.mlm_checkpoint or args.clf_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Saved with the model: `pipeline(..., truncation=True)` and `tokenizer(..., truncation=True)` then cut
    # texts to the length the classifier was trained on.
    tokenizer.model_max_length = args.max_seq_len
    return tokenizer


def load_model(args: argparse.Namespace, names: list[str]) -> PerceiverForSequenceClassification:
    """Stage 1: a classifier around the encoder of `--mlm_checkpoint`; stage 2: the classifier of `--clf_checkpoint`.

    `dropout` and `freeze_encoder` are config fields, so passing them to `from_pretrained` sets them for this run.
    """
    overrides = {"dropout": args.dropout, "freeze_encoder": args.freeze_encoder}
    if args.mlm_checkpoint is not None:
        # transformers reports the classification decoder's weights as newly initialised and the masked-LM
        # decoder's as unused: the text adapter and encoder are the only weights carried over.
        return PerceiverForSequenceClassification.from_pretrained(
            args.mlm_checkpoint, **label_config(names), **overrides
        )
    model = PerceiverForSequenceClassification.from_pretrained(args.clf_checkpoint, **overrides)
    checkpoint_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if checkpoint_names != names:
        raise ValueError(
            f"--clf_checkpoint {args.clf_checkpoint!r} classifies {checkpoint_names}, but the data's classes "
            f"are {names}: continue a classifier on data with the same classes"
        )
    return model


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    # Before anything is written: a missing model, a tokenizer larger than its vocabulary, too long texts.
    option = "--mlm_checkpoint" if args.mlm_checkpoint is not None else "--clf_checkpoint"
    source = args.mlm_checkpoint or args.clf_checkpoint
    check_pretrained(option, source, tokenizer_option=option, tokenizer_source=source, max_seq_len=args.max_seq_len)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data
    raw_datasets = load_raw_datasets(args, default_data_files=SAMPLE_DATA_FILES, hub_splits=HUB_SPLITS)
    if args.test_file is not None:
        raw_datasets["test"] = load_local_files(args.test_file, "test")  # labels encoded with the other splits
    check_training_column(raw_datasets, "--text_column", args.text_column)
    raw_datasets, label_names = encode_labels(raw_datasets, args.label_column)
    accelerator.print(raw_datasets)
    accelerator.print(f"Classes: {label_names}")

    # ------------------------------------------------------------------ model and tokenizer
    model = load_model(args, label_names)
    if args.max_seq_len is None:
        args.max_seq_len = model.config.max_position_embeddings
    tokenizer = tokenizer_for(args, checkpoint)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(
        f"Model: {num_params:,} parameters, {num_trainable:,} trainable"
        + (" (encoder frozen)" if model.config.freeze_encoder else "")
    )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_len)
        encoded["labels"] = batch[args.label_column]
        return encoded

    # The main process tokenizes first and fills the datasets cache; the others then read from it.
    with accelerator.main_process_first():
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=raw_datasets["train"].column_names, desc="Tokenizing"
        )

    # Padding to a multiple of 8 suits tensor cores, but must not pad beyond --max_seq_len.
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.max_seq_len % 8 == 0 else None)
    train_dataloader, eval_dataloader = build_dataloaders(tokenized, args, collator)

    # ------------------------------------------------------------------ optimizer, schedule, training
    # Only trainable weights enter the optimizer: with a frozen encoder, AdamW never sees its weights.
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})
    evaluate_fn = accuracy_evaluator(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=tokenizer, checkpoint=checkpoint)
    if "test" in tokenized:
        # The final weights, once: the test split reports, it never chooses.
        test_dataloader = accelerator.prepare(
            build_dataloader(tokenized["test"], collator, args.eval_batch_size, shuffle=False, seed=args.seed)
        )
        test_metrics = accuracy_evaluator(accelerator, prepared.model, test_dataloader)()
        metrics.update({f"test_{name}": value for name, value in test_metrics.items()})
        accelerator.print(f"Test: loss {test_metrics['loss']:.4f}, accuracy {test_metrics['accuracy']:.4f}")

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, tokenizer)
    finish_run(accelerator, args, metrics, hub_repo_id)

    if accelerator.is_main_process:
        # Load the saved model the way users will, to show that it works end to end.
        classifier = pipeline("sentiment-analysis", model=args.output_dir)
        print(f"\nValidation: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
        print(f"Predictions of pipeline('sentiment-analysis', model={args.output_dir!r}):")
        for sample, prediction in zip(args.predict_samples, classifier(list(args.predict_samples)), strict=True):
            print(f"  {prediction['label']} ({prediction['score']:.3f}): {sample}")


if __name__ == "__main__":
    main()
