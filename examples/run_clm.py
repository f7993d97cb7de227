"""Train a Perceiver AR causal language model with Accelerate, and report validation bits per token / byte.

With no option, the script trains a small byte-level model on the IMDb sample shipped in ``examples/data`` (a
few minutes on 2 CPU cores), then prints sample generations:

    python examples/run_clm.py

On the full IMDb data, from local files (train + unsupervised to train, test to validate):

    python examples/run_clm.py --train_file imdb/train.parquet imdb/unsupervised.parquet \\
        --validation_file imdb/test.parquet --max_eval_samples 500 --max_steps 3000 \\
        --checkpointing_steps 250 --output_dir outputs/clm-imdb

or from the Hub with ``--dataset_name imdb``. The steps follow transformers' ``run_clm_no_trainer.py``:
tokenize every text without special tokens (byte-level ``PerceiverTokenizer`` by default, a WordPiece
tokenizer trained on the training texts with ``--tokenizer wordpiece``, or ``--tokenizer_name``), end each
text with the end-of-text token, concatenate and cut into blocks of ``--max_seq_len`` tokens. Each block is
a context: its last ``--num_latents`` tokens are the latents, the rest the prefix, so the model learns to
predict the last ``num_latents - 1`` tokens of every block from up to ``max_seq_len`` tokens of context.
Validation reports the loss in nats, bits per token and bits per byte (UTF-8 bytes of the validation texts
over their tokens) and a few generations. The model and tokenizer are saved so that
``pipeline("text-generation", model=<output_dir>)`` loads them (pass ``add_special_tokens=False``: a causal LM
continues the text itself). ``--checkpointing_steps`` and ``--resume_from_checkpoint`` let a run stop and
continue exactly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from accelerate.utils import broadcast_object_list
from common import (
    build_dataloaders,
    build_parser,
    check_pretrained,
    check_training_column,
    create_hub_repo,
    evaluate_model,
    find_checkpoint,
    finish_run,
    group_texts,
    load_raw_datasets,
    parse_args,
    positive_int,
    prepare_training,
    probability,
    save_model,
    setup_accelerator,
    train,
)
from run_mlm import HUB_SPLITS, SAMPLE_DATA_FILES  # the same text as the masked LM: IMDb train + unsupervised
from transformers import AutoModelForCausalLM, AutoTokenizer, PerceiverTokenizer, default_data_collator, pipeline

# Importing perceiver_hf registers the perceiver_ar model type with the Auto classes (and the pipeline).
from perceiver_hf import PerceiverARConfig, PerceiverARForCausalLM, train_wordpiece_tokenizer

DEFAULT_PROMPTS = ["This movie was", "I have never seen"]


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])

    model = parser.add_argument_group("model (architecture options are ignored with --model_name_or_path)")
    model.add_argument("--model_name_or_path", default=None, help="Continue training a saved Perceiver AR model.")
    model.add_argument(
        "--tokenizer",
        choices=("bytes", "wordpiece"),
        default="bytes",
        help="bytes: transformers' byte-level PerceiverTokenizer (no training); wordpiece: train one on the "
        "training texts (--vocab_size). Ignored with --tokenizer_name or --model_name_or_path.",
    )
    model.add_argument("--tokenizer_name", default=None, help="Use this tokenizer (folder or Hub id).")
    model.add_argument("--vocab_size", type=positive_int, default=8_000, help="WordPiece vocabulary size.")
    model.add_argument(
        "--max_seq_len",
        type=positive_int,
        default=512,
        help="Tokens per training block (prefix + latents); also the model's max_position_embeddings.",
    )
    model.add_argument("--num_latents", type=positive_int, default=128, help="Latent positions (the last tokens).")
    model.add_argument("--hidden_size", type=positive_int, default=128, help="Width of embeddings and latents.")
    model.add_argument("--num_self_attention_layers", type=positive_int, default=4, help="Self-attention layers.")
    model.add_argument("--num_heads", type=positive_int, default=4, help="Heads of every attention layer.")
    model.add_argument(
        "--prefix_dropout", type=probability, default=0.5, help="Fraction of prefix positions dropped in training."
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--prompts", nargs="+", default=DEFAULT_PROMPTS, help="Prompts continued after each evaluation."
    )
    generation.add_argument("--max_new_tokens", type=positive_int, default=64, help="Tokens generated per prompt.")
    generation.add_argument("--top_k", type=positive_int, default=10, help="Top-k sampling of the generations.")

    parser.set_defaults(
        output_dir="outputs/clm",
        batch_size=16,
        learning_rate=1e-3,
        dropout=0.0,
        max_steps=300,
        eval_steps=100,
        logging_steps=10,
        max_eval_samples=100,
    )
    args = parse_args(parser, argv)
    if args.num_latents < 2 or args.num_latents > args.max_seq_len:
        parser.error(
            f"argument --num_latents: must be in [2, --max_seq_len ({args.max_seq_len})], got {args.num_latents}"
        )
    return args


def load_tokenizer(args: argparse.Namespace, accelerator, texts: Sequence[str], checkpoint):
    if checkpoint is not None:
        return AutoTokenizer.from_pretrained(checkpoint)
    if args.tokenizer_name or args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if args.tokenizer == "bytes":
        return PerceiverTokenizer(model_max_length=args.max_seq_len)
    trained = None
    if accelerator.is_main_process:  # WordPiece training is not deterministic across processes
        trained = train_wordpiece_tokenizer((t for t in texts if t), args.vocab_size, args.max_seq_len)
    return broadcast_object_list([trained])[0]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    if args.model_name_or_path is not None:
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
    tokenizer = load_tokenizer(args, accelerator, raw_datasets["train"][args.text_column], checkpoint)
    tokenizer.padding_side = "left"  # batched generation continues each prompt from its last token
    end_of_text = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end_of_text is None:
        raise ValueError("the tokenizer needs an eos or sep token to mark the end of each text")
    accelerator.print(f"Tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[args.text_column], add_special_tokens=False)["input_ids"]
        num_bytes = [len(text.encode("utf-8")) for text in batch[args.text_column]]
        return {"input_ids": [row + [end_of_text] for row in ids], "num_bytes": num_bytes}

    def group(batch: dict[str, list]) -> dict[str, list]:
        # Full blocks of the concatenated texts; each block is its own target (the model shifts internally).
        blocks = group_texts(batch, args.max_seq_len)
        return {"input_ids": blocks["input_ids"], "labels": [list(b) for b in blocks["input_ids"]]}

    with accelerator.main_process_first():
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=raw_datasets["train"].column_names, desc="Tokenizing"
        )
        validation_bytes = sum(tokenized["validation"]["num_bytes"])
        validation_tokens = sum(len(ids) for ids in tokenized["validation"]["input_ids"])
        tokenized = tokenized.remove_columns("num_bytes")
        blocks = tokenized.map(group, batched=True, batch_size=1000, desc=f"Grouping into {args.max_seq_len}")
    # Bits per byte = bits per token x tokens per byte (the end-of-text tokens count as tokens, not bytes).
    tokens_per_byte = validation_tokens / validation_bytes
    accelerator.print(
        f"Blocks of {args.max_seq_len} tokens: train {len(blocks['train'])}, validation {len(blocks['validation'])}; "
        f"{tokens_per_byte:.3f} tokens per byte"
    )
    if len(blocks["train"]) == 0 or len(blocks["validation"]) == 0:
        raise ValueError(f"--max_seq_len ({args.max_seq_len}) is longer than the data of a split: lower it")
    train_dataloader, eval_dataloader = build_dataloaders(blocks, args, default_data_collator)

    # ------------------------------------------------------------------ model
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, prefix_dropout=args.prefix_dropout)
        model.config.num_latents = max(model.config.num_latents, args.num_latents)
    else:
        config = PerceiverARConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=args.max_seq_len,
            num_latents=args.num_latents,
            hidden_size=args.hidden_size,
            num_self_attention_layers=args.num_self_attention_layers,
            num_cross_attention_heads=args.num_heads,
            num_self_attention_heads=args.num_heads,
            prefix_dropout=args.prefix_dropout,
            dropout=args.dropout,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_of_text,
        )
        model = PerceiverARForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_of_text
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})

    def evaluate_fn(step: int) -> dict[str, float]:
        # Every block contributes num_latents - 1 predicted tokens: the mean over blocks is the mean over tokens.
        results = evaluate_model(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
        results["bits_per_token"] = results["loss"] / math.log(2)
        results["bits_per_byte"] = results["bits_per_token"] * tokens_per_byte
        results["perplexity"] = math.exp(min(results["loss"], 50.0))
        samples = generate_samples(accelerator.unwrap_model(prepared.model), tokenizer, args)
        accelerator.log({"eval/generations": "  \n".join(samples)}, step=step)
        for sample in samples:
            accelerator.print(f"  {sample!r}")
        return results

    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=tokenizer, checkpoint=checkpoint)

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, tokenizer)
    finish_run(accelerator, args, metrics, hub_repo_id)
    if accelerator.is_main_process:
        generator = pipeline("text-generation", model=args.output_dir)
        print(
            f"\nValidation: loss {metrics['loss']:.4f} nats, {metrics['bits_per_token']:.4f} bits per token, "
            f"{metrics['bits_per_byte']:.4f} bits per byte"
        )
        print(f"Generations of pipeline('text-generation', model={args.output_dir!r}) (top-{args.top_k} sampling):")
        torch.manual_seed(args.seed)
        for prompt in args.prompts:
            out = generator(
                prompt, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=args.top_k, add_special_tokens=False
            )
            print(f"  {out[0]['generated_text']!r}")


@torch.no_grad()
def generate_samples(model: PerceiverARForCausalLM, tokenizer, args: argparse.Namespace) -> list[str]:
    """Top-k samples continuing `args.prompts` (seeded, so evaluations are comparable; the global random state
    of training is restored afterwards)."""
    was_training = model.training
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=args.top_k)
    torch.random.set_rng_state(state)
    model.train(was_training)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


if __name__ == "__main__":
    main()
