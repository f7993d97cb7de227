"""Pretrain (or continue training) a Perceiver IO masked language model with Accelerate.

With no option, the script trains a small model on the IMDb sample shipped in ``examples/data`` (about
3 minutes on 2 CPU cores), then prints fill-mask predictions for ``--predict_samples``:

    python examples/run_mlm.py

On the full IMDb data, from local files (train + unsupervised to pretrain; 5% held out to validate):

    python examples/run_mlm.py --train_file imdb/train.parquet imdb/unsupervised.parquet \\
        --max_seq_len 512 --d_model 256 --num_latents 64 --d_latents 256 --max_steps 5000 \\
        --batch_size 16 --max_eval_samples 1000 --mixed_precision bf16 --output_dir outputs/mlm-imdb

(``examples/imdb_quality.sh`` runs it with a validation split that the sentiment classifier then shares)

or from the Hub with ``--dataset_name imdb``. The steps follow transformers'
``run_mlm_no_trainer.py``: train a WordPiece tokenizer on the training texts (unless
``--tokenizer_name`` is given), tokenize, mask 15% of the tokens (80% [MASK], 10% random, 10% kept),
train with AdamW, evaluate (loss, perplexity, masked-token accuracy) and save the model and tokenizer
so that ``pipeline("fill-mask", model=<output_dir>)`` loads them. Watch the run with
``tensorboard --logdir <output_dir>/runs``: losses, learning rate and, after each evaluation, the top-k
fills of ``--predict_samples``. ``--checkpointing_steps`` and ``--resume_from_checkpoint`` let a run
stop and continue exactly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from accelerate.utils import broadcast_object_list
from common import (
    EXAMPLES_DIR,
    BatchSeededCollator,
    accuracy_evaluator,
    build_dataloaders,
    build_parser,
    check_pretrained,
    check_training_column,
    create_hub_repo,
    find_checkpoint,
    finish_run,
    group_texts,
    load_raw_datasets,
    non_negative_int,
    parse_args,
    positive_float,
    positive_int,
    prepare_training,
    probability,
    save_model,
    setup_accelerator,
    train,
)
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, pipeline

# Importing perceiver_hf registers the perceiver_io model type with the Auto classes (and the pipeline).
from perceiver_hf import PerceiverConfig, PerceiverForMaskedLM, train_wordpiece_tokenizer

SAMPLE_DIR = EXAMPLES_DIR / "data"
# Default data: the shipped IMDb sample; pretrain on train + unsupervised, validate on test.
SAMPLE_DATA_FILES = {
    "train": [str(SAMPLE_DIR / "imdb_train.parquet"), str(SAMPLE_DIR / "imdb_unsupervised.parquet")],
    "validation": [str(SAMPLE_DIR / "imdb_test.parquet")],
}
# The same splits of the Hub's "imdb" dataset.
HUB_SPLITS = {"train": "train+unsupervised", "validation": "test"}
DEFAULT_PREDICT_SAMPLES = ["i have watched this [MASK] and it was awesome"]


def context_kernel_size(value: str) -> int | None:
    """argparse type: 0 (no context convolution, None in the config) or an odd integer >= 1."""
    number = non_negative_int(value)
    if number and number % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be 0 or an odd integer, got {value!r}")
    return number or None


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])

    model = parser.add_argument_group("model (architecture options are ignored with --model_name_or_path)")
    model.add_argument(
        "--model_name_or_path",
        default=None,
        help="Continue training a saved perceiver_hf masked LM (a folder written by this script, or a Hub id).",
    )
    model.add_argument(
        "--tokenizer_name",
        default=None,
        help="Use this tokenizer (folder or Hub id) instead of training one. Default: the tokenizer of "
        "--model_name_or_path, or a new WordPiece tokenizer trained on the training texts.",
    )
    model.add_argument(
        "--vocab_size", type=positive_int, default=10_000, help="Size of the trained tokenizer's vocabulary."
    )
    model.add_argument(
        "--max_seq_len",
        type=positive_int,
        default=64,
        help="Tokens per training block (texts grouped, or truncated with --line_by_line); it is also the model's "
        "max_position_embeddings. The default keeps the sample run short; use 512 on the full IMDb data.",
    )
    model.add_argument("--num_latents", type=positive_int, default=32, help="Number of latent vectors.")
    model.add_argument("--d_latents", type=positive_int, default=128, help="Channels of each latent vector.")
    model.add_argument("--d_model", type=positive_int, default=128, help="Channels of the token embeddings.")
    model.add_argument(
        "--num_self_attention_layers_per_block",
        type=positive_int,
        default=4,
        help="Self-attention layers per block.",
    )
    model.add_argument(
        "--num_self_attention_blocks",
        type=positive_int,
        default=1,
        help="Self-attention blocks (they share weights, as in DeepMind's Perceiver IO).",
    )
    model.add_argument(
        "--num_cross_attention_heads",
        type=positive_int,
        default=4,
        help="Heads of the encoder cross-attention.",
    )
    model.add_argument(
        "--num_self_attention_heads", type=positive_int, default=4, help="Heads of the latent self-attention."
    )
    model.add_argument(
        "--num_decoder_heads", type=positive_int, default=4, help="Heads of the decoder cross-attention."
    )
    model.add_argument(
        "--context_kernel_size",
        type=context_kernel_size,
        default=5,
        help="Width (odd) of the text adapter's convolution that mixes each token's embedding with its neighbours' "
        "(config.context_kernel_size); 0 for none, as in DeepMind's model.",
    )
    model.add_argument(
        "--mlm_decoder_queries",
        choices=("inputs", "positions"),
        default="inputs",
        help="The decoder's queries (config.mlm_decoder_queries): each position's adapted input (token, position "
        "and context features), or DeepMind's learned per-position queries. 'inputs' leaves the unigram "
        "plateau within a few hundred steps; 'positions' takes thousands.",
    )
    model.add_argument(
        "--initializer_range",
        type=positive_float,
        default=0.02,
        help="Standard deviation of the weight initialisation (config.initializer_range).",
    )
    model.add_argument(
        "--tie_word_embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Share the token embedding with the output projection.",
    )

    mlm = parser.add_argument_group("masked language modelling")
    mlm.add_argument(
        "--mlm_probability", type=probability, default=0.15, help="Fraction of the tokens to mask (80/10/10)."
    )
    mlm.add_argument(
        "--predict_samples",
        nargs="+",
        default=DEFAULT_PREDICT_SAMPLES,
        help="Sentences with [MASK] tokens whose top-k fills are logged after each evaluation and printed at the end.",
    )
    mlm.add_argument("--top_k", type=positive_int, default=5, help="Number of fills shown per [MASK].")
    mlm.add_argument(
        "--line_by_line",
        action="store_true",
        help="One training example per text, truncated to --max_seq_len. Default, as transformers' run_mlm.py: the "
        "tokenized texts are concatenated and cut into blocks of --max_seq_len tokens, so no text is cut short.",
    )

    # Defaults that train a small model on the shipped sample in about 3 minutes on 2 CPU cores (examples/README.md,
    # "Masked language modelling"). Chosen on the sample's 200 validation reviews (drawn from IMDb's test split;
    # imdb_quality.sh validates on held-out training reviews instead): with DeepMind's per-position decoder queries
    # (--mlm_decoder_queries positions) a model this small stays on the unigram plateau (fills "i . this movie it")
    # for thousands of steps; with queries built from the inputs and the context convolution it reaches about 10%
    # masked-token accuracy within 600 steps. Short blocks (64 tokens, 2 per latent) keep steps cheap; dropout
    # only slows a run this short.
    parser.set_defaults(
        output_dir="outputs/mlm",
        batch_size=32,
        learning_rate=1e-3,
        dropout=0.0,
        max_steps=1500,
        eval_steps=500,
        logging_steps=25,
    )
    args = parse_args(parser, argv)

    for sample in args.predict_samples:
        if "[MASK]" not in sample:
            parser.error(f"argument --predict_samples: {sample!r} has no [MASK] token")
    if args.max_seq_len < 3:
        parser.error(f"argument --max_seq_len: must be >= 3 ([CLS], a token, [SEP]), got {args.max_seq_len}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    if args.model_name_or_path is not None:
        # Before anything is written: a missing model, a tokenizer larger than its vocabulary, too long texts.
        check_pretrained(
            "--model_name_or_path",
            args.model_name_or_path,
            tokenizer_option="--tokenizer_name" if args.tokenizer_name else "--model_name_or_path",
            tokenizer_source=args.tokenizer_name or args.model_name_or_path,
            max_seq_len=args.max_seq_len,
        )
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data
    raw_datasets = load_raw_datasets(args, default_data_files=SAMPLE_DATA_FILES, hub_splits=HUB_SPLITS)
    check_training_column(raw_datasets, "--text_column", args.text_column)
    accelerator.print(raw_datasets)

    # ------------------------------------------------------------------ tokenizer
    if checkpoint is not None:
        # The tokenizer saved with the checkpoint: exactly the vocabulary the run started with.
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    elif args.tokenizer_name or args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    else:
        # WordPiece training is not deterministic (tokenizers' hash-map order breaks count ties differently in
        # each process, huggingface/tokenizers#1794): the main process trains, the others receive its tokenizer.
        trained = None
        if accelerator.is_main_process:
            trained = train_wordpiece_tokenizer(
                (text for text in raw_datasets["train"][args.text_column] if text),
                vocab_size=args.vocab_size,
                model_max_length=args.max_seq_len,
            )
        tokenizer = broadcast_object_list([trained])[0]
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ValueError("the tokenizer needs a [MASK] and a [PAD] token for masked language modelling")
    accelerator.print(f"Tokenizer: {len(tokenizer)} tokens")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # The special-tokens mask keeps the collator from masking [CLS] and [SEP].
        return tokenizer(
            batch[args.text_column],
            truncation=args.line_by_line,
            max_length=args.max_seq_len if args.line_by_line else None,
            return_special_tokens_mask=True,
            verbose=False,  # grouped texts are longer than the model on purpose: no length warning
        )

    # The main process tokenizes first and fills the datasets cache; the others then read from it.
    with accelerator.main_process_first():
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=raw_datasets["train"].column_names, desc="Tokenizing"
        )
        if not args.line_by_line:
            tokenized = tokenized.map(
                group_texts,
                batched=True,
                fn_kwargs={"block_size": args.max_seq_len},
                desc=f"Grouping texts in blocks of {args.max_seq_len}",
            )

    # Masks are drawn per batch from (seed, epoch, batch index): see BatchSeededCollator.
    masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability, pad_to_multiple_of=8)
    train_dataloader, eval_dataloader = build_dataloaders(
        tokenized, args, BatchSeededCollator(masking, args.seed), BatchSeededCollator(masking, args.seed + 1)
    )

    # ------------------------------------------------------------------ model
    if args.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path, dropout=args.dropout)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but {args.model_name_or_path} only embeds "
                f"{model.config.vocab_size}: use the model's own tokenizer"
            )
    else:
        config = PerceiverConfig(
            input_adapter="text",
            vocab_size=len(tokenizer),
            max_position_embeddings=args.max_seq_len,
            d_model=args.d_model,
            num_latents=args.num_latents,
            d_latents=args.d_latents,
            num_cross_attention_layers=1,
            num_self_attention_blocks=args.num_self_attention_blocks,
            num_self_attention_layers_per_block=args.num_self_attention_layers_per_block,
            num_cross_attention_heads=args.num_cross_attention_heads,
            num_self_attention_heads=args.num_self_attention_heads,
            num_decoder_heads=args.num_decoder_heads,
            dropout=args.dropout,
            tie_word_embeddings=args.tie_word_embeddings,
            context_kernel_size=args.context_kernel_size,
            mlm_decoder_queries=args.mlm_decoder_queries,
            initializer_range=args.initializer_range,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = PerceiverForMaskedLM(config)
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})
    # Accuracy of the predictions at the masked positions (labels -100 elsewhere are left out).
    evaluate_accuracy = accuracy_evaluator(accelerator, prepared.model, prepared.eval_dataloaders["validation"])

    def evaluate_fn(step: int) -> dict[str, float]:
        results = evaluate_accuracy(step)
        results["perplexity"] = math.exp(min(results["loss"], 50.0))
        fills = fill_masks(accelerator.unwrap_model(prepared.model), tokenizer, args.predict_samples, args.top_k)
        # Two trailing spaces make TensorBoard's markdown break the line.
        accelerator.log({"eval/predictions": "  \n".join(fills)}, step=step)
        return results

    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=tokenizer, checkpoint=checkpoint)

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, tokenizer)
    finish_run(accelerator, args, metrics, hub_repo_id)

    if accelerator.is_main_process:
        # Load the saved model the way users will, to show that it works end to end.
        fill_mask = pipeline("fill-mask", model=args.output_dir, top_k=args.top_k)
        print(f"\nValidation: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
        print(f"Fill-mask predictions of pipeline('fill-mask', model={args.output_dir!r}):")
        for sample in args.predict_samples:
            predictions = fill_mask(sample)
            # One list of fills per [MASK]; a single [MASK] gives the list directly.
            per_mask = predictions if isinstance(predictions[0], list) else [predictions]
            print(f"  {sample}")
            for fills in per_mask:
                print("    " + ", ".join(f"{p['token_str']} ({p['score']:.3f})" for p in fills))


@torch.no_grad()
def fill_masks(model: PerceiverForMaskedLM, tokenizer, samples: Sequence[str], top_k: int) -> list[str]:
    """Return one line per sample: the sample followed by the `top_k` fills of each of its [MASK] tokens."""
    was_training = model.training
    model.eval()
    inputs = tokenizer(list(samples), padding=True, truncation=True, return_tensors="pt").to(model.device)
    logits = model(**inputs).logits  # (B, L, vocab)
    lines = []
    for i, sample in enumerate(samples):
        mask_positions = (inputs["input_ids"][i] == tokenizer.mask_token_id).nonzero().flatten()
        top = logits[i, mask_positions].topk(top_k, dim=-1).indices  # (masks, top_k)
        fills = [" | ".join(tokenizer.convert_ids_to_tokens(ids)) for ids in top.tolist()]
        lines.append(f"{sample} -> " + " ; ".join(fills))
    model.train(was_training)
    return lines


if __name__ == "__main__":
    main()
