"""Train a Perceiver IO classifier on images and audio at once: MNIST digits paired with spoken digits (FSDD).

Each example is an MNIST image and a Free Spoken Digit Dataset clip of the same digit (as AV-MNIST). One
`PerceiverForMultimodalClassification` reads both in one forward pass: each modality gets its own Fourier
position features, is padded to a common width and tagged with a learned modality embedding, and the
encoder attends to the concatenation:

    python examples/run_multimodal_classification.py --output_dir outputs/mnist-fsdd

Data: with no data option, the 50-pair sample shipped in ``examples/data/mnist_fsdd_pairs.parquet`` (held-out
part: ``--validation_split_percentage``). ``--mnist_dir ../shared/data/mnist --fsdd_dir ../shared/data/fsdd``
pairs the full datasets by label at load time: every FSDD clip (train: 2,700, test: 300, the official split)
gets an MNIST image of its digit from the same split. ``--train_file`` / ``--validation_file`` take files that
are already paired (``image``, ``audio`` and ``label`` columns).

``--modalities`` trains on a subset (``image`` or ``audio`` alone, for comparison); ``--modality_dropout p``
hides one of the two modalities of a training example with probability p, so the model also works when one
is missing. The final evaluation reports the accuracy with both modalities and with each one missing
(``eval_results.json``). The model and its `PerceiverProcessor` are saved with ``save_pretrained``; load them
with ``AutoModelForMultimodalClassification`` and ``AutoProcessor`` after ``import perceiver_hf``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    EXAMPLES_DIR,
    BatchSeededCollator,
    accuracy_evaluator,
    argument_group,
    build_dataloader,
    build_parser,
    create_hub_repo,
    encode_labels,
    find_checkpoint,
    finish_run,
    label_config,
    load_raw_datasets,
    parse_args,
    positive_int,
    prepare_training,
    probability,
    save_model,
    setup_accelerator,
    split_and_limit,
    train,
)
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset
from run_audio_classification import decode_audio

# Importing perceiver_hf registers the perceiver_io model type, its processors and its Auto classes.
from perceiver_hf import (
    PerceiverConfig,
    PerceiverFeatureExtractor,
    PerceiverForMultimodalClassification,
    PerceiverImageProcessor,
    PerceiverProcessor,
)

SAMPLE_DATA_FILES = {"train": [str(EXAMPLES_DIR / "data" / "mnist_fsdd_pairs.parquet")]}
MODALITIES = ("image", "audio")


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options of the MNIST + FSDD pairs (`load_pairs`), shared with run_multimodal_autoencoding.py."""
    data = argument_group(parser, "data")
    data.add_argument("--mnist_dir", default=None, help="Folder with MNIST train.parquet and test.parquet.")
    data.add_argument("--fsdd_dir", default=None, help="Folder with FSDD train.parquet and test.parquet.")
    data.add_argument("--image_column", default="image", help="Column holding the images.")
    data.add_argument("--audio_column", default="audio", help="Column holding the audio.")


def check_pair_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.mnist_dir is None) != (args.fsdd_dir is None):
        parser.error("give both --mnist_dir and --fsdd_dir (or neither)")
    if args.mnist_dir is not None and (args.train_file is not None or args.dataset_name is not None):
        parser.error("give either --mnist_dir/--fsdd_dir or --train_file/--dataset_name, not both")
    for option in ("mnist_dir", "fsdd_dir"):
        folder = getattr(args, option)
        if folder is not None and not all((Path(folder) / f"{s}.parquet").is_file() for s in ("train", "test")):
            parser.error(f"argument --{option}: {folder!r} must hold train.parquet and test.parquet")


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    add_pair_arguments(parser)

    model = parser.add_argument_group("model (built from scratch)")
    model.add_argument(
        "--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES), help="Modalities the model reads."
    )
    model.add_argument(
        "--modality_dropout",
        type=probability,
        default=0.0,
        help="Training: probability of hiding one of the two modalities of an example (chosen at random).",
    )
    model.add_argument("--audio_patch_size", type=positive_int, default=128, help="Audio samples per position.")
    model.add_argument(
        "--audio_spectrogram",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Audio positions hold the log power spectrum of their patch (else the raw samples).",
    )
    model.add_argument(
        "--max_audio_seconds", type=float, default=2.5, help="Longest clip; longer clips are cut (FSDD: 2.28 s)."
    )
    model.add_argument("--image_freq_bands", type=positive_int, default=8, help="Fourier bands per image axis.")
    model.add_argument("--audio_freq_bands", type=positive_int, default=16, help="Fourier bands of the time axis.")
    model.add_argument(
        "--pooling", choices=("decoder", "mean", "latents"), default="decoder", help="How latents feed the head."
    )
    model.add_argument("--num_latents", type=positive_int, default=32, help="Number of latent vectors.")
    model.add_argument("--d_latents", type=positive_int, default=64, help="Width of the latent vectors.")
    model.add_argument(
        "--num_layers", type=positive_int, default=1, help="Cross-attention layers, each followed by a block."
    )
    model.add_argument(
        "--num_self_attention_layers_per_block", type=positive_int, default=4, help="Self-attention layers per block."
    )
    model.add_argument("--num_heads", type=positive_int, default=8, help="Heads of every attention.")
    model.add_argument("--widening_factor", type=positive_int, default=2, help="MLP widening factor.")
    model.add_argument("--hidden_act", choices=("gelu", "geglu"), default="gelu", help="MLP activation.")
    model.add_argument(
        "--initializer_range", type=float, default=0.1, help="Standard deviation of the weight initialisation."
    )

    parser.set_defaults(
        output_dir="outputs/multimodal-classification",
        batch_size=32,
        learning_rate=3e-3,
        weight_decay=1e-4,
        dropout=0.0,
        max_epochs=10,
        logging_steps=20,
        validation_split_percentage=20,
    )
    args = parse_args(parser, argv)
    check_pair_arguments(parser, args)
    if args.modality_dropout > 0 and len(args.modalities) < 2:
        parser.error("--modality_dropout needs both modalities")
    return args


def pair_by_label(images: Dataset, clips: Dataset, label_column: str, seed: int) -> Dataset:
    """Give every clip an image of the same label: the images of each label, shuffled with `seed`, in turn."""
    rng = np.random.default_rng(seed)
    image_labels = np.asarray(images[label_column])
    pools = {label: rng.permutation(np.flatnonzero(image_labels == label)) for label in np.unique(image_labels)}
    used = {label: 0 for label in pools}
    picked = []
    for label in clips[label_column]:
        if label not in pools:
            raise ValueError(f"no image with label {label} to pair with a clip")
        picked.append(int(pools[label][used[label] % len(pools[label])]))
        used[label] += 1
    chosen = images.select(picked).select_columns(["image"])
    return concatenate_datasets([clips, chosen], axis=1)


def load_pairs(args: argparse.Namespace) -> DatasetDict:
    """Paired train/validation splits: the full datasets paired at load time, given files, or the sample."""
    if args.mnist_dir is None:
        return load_raw_datasets(args, default_data_files=SAMPLE_DATA_FILES)
    splits = ("train", "test")
    mnist = load_dataset("parquet", data_files={s: str(Path(args.mnist_dir) / f"{s}.parquet") for s in splits})
    fsdd = load_dataset("parquet", data_files={s: str(Path(args.fsdd_dir) / f"{s}.parquet") for s in splits})
    raw = DatasetDict(
        {
            "train": pair_by_label(mnist["train"], fsdd["train"], args.label_column, args.seed),
            "validation": pair_by_label(mnist["test"], fsdd["test"], args.label_column, args.seed),
        }
    )
    return split_and_limit(raw, args)


def build_config(args: argparse.Namespace, names: list[str]) -> PerceiverConfig:
    modalities = []
    if "image" in args.modalities:
        modalities.append(
            {"name": "image", "channels": 1, "num_axes": 2, "num_freq_bands": args.image_freq_bands, "max_freq": 28.0}
        )
    if "audio" in args.modalities:
        max_samples = math.ceil(args.max_audio_seconds * args.sampling_rate)
        modalities.append(
            {
                "name": "audio",
                "channels": 1,
                "num_axes": 1,
                "num_freq_bands": args.audio_freq_bands,
                "max_freq": float(math.ceil(max_samples / args.audio_patch_size)),
                "max_length": max_samples,
                "patch_size": args.audio_patch_size,
                "spectrogram": args.audio_spectrogram,
            }
        )
    return PerceiverConfig(
        input_adapter="multimodal",
        modalities=modalities,
        pooling=args.pooling,
        num_latents=args.num_latents,
        d_latents=args.d_latents,
        num_cross_attention_layers=args.num_layers,
        num_self_attention_blocks=args.num_layers,
        num_self_attention_layers_per_block=args.num_self_attention_layers_per_block,
        first_self_attention_block_shared=False,
        num_cross_attention_heads=args.num_heads,
        num_self_attention_heads=args.num_heads,
        num_decoder_heads=1,
        cross_attention_widening_factor=args.widening_factor,
        self_attention_widening_factor=args.widening_factor,
        decoder_widening_factor=args.widening_factor,
        hidden_act=args.hidden_act,
        dropout=args.dropout,
        initializer_range=args.initializer_range,
        **label_config(names),
    )


class PairCollator:
    """Examples -> `{"image", "audio", "audio_mask", "image_mask", "labels"}` for the modalities in `present`.

    With `modality_dropout`, one modality of an example is hidden (its mask row set to 0) with that probability;
    the torch RNG draws, which `BatchSeededCollator` seeds per batch.
    """

    def __init__(
        self, processor: PerceiverProcessor, args: argparse.Namespace, present: Sequence[str], dropout: float = 0.0
    ) -> None:
        self.processor = processor
        self.present = list(present)
        self.dropout = dropout
        self.image_column, self.label_column = args.image_column, args.label_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [e[self.image_column] for e in examples] if "image" in self.present else None
        audio = [np.asarray(e["input_values"], dtype=np.float32) for e in examples] if "audio" in self.present else None
        rate = self.processor.feature_extractor.sampling_rate if audio is not None else None
        batch = dict(self.processor(images=images, audio=audio, sampling_rate=rate, return_tensors="pt"))
        if self.dropout > 0:
            hidden = torch.rand(len(examples)) < self.dropout
            hide_image = hidden & (torch.rand(len(examples)) < 0.5)
            batch["image_mask"] = (~hide_image).long()
            batch["audio_mask"] = batch["audio_mask"] * (~(hidden & ~hide_image)).long()[:, None]
        batch["labels"] = torch.tensor([e[self.label_column] for e in examples], dtype=torch.long)
        return batch


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data
    raw_datasets = load_pairs(args)
    raw_datasets, label_names = encode_labels(raw_datasets, args.label_column)
    with accelerator.main_process_first():
        raw_datasets, args.sampling_rate = decode_audio(raw_datasets, args.audio_column)
    accelerator.print(raw_datasets)

    # ------------------------------------------------------------------ model and processor
    config = build_config(args, label_names)
    model = PerceiverForMultimodalClassification(config)
    image_processor = PerceiverImageProcessor(
        size={"height": 28, "width": 28}, do_convert_rgb=False, do_convert_grayscale=True, image_mean=[0.5],
        image_std=[0.5],
    )  # fmt: skip
    feature_extractor = PerceiverFeatureExtractor(
        sampling_rate=args.sampling_rate, max_length=math.ceil(args.max_audio_seconds * args.sampling_rate)
    )
    processor = PerceiverProcessor.from_perceiver_config(
        config, image_processor=image_processor, feature_extractor=feature_extractor
    )
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()):,} parameters, modalities {args.modalities}")

    train_collator = BatchSeededCollator(
        PairCollator(processor, args, args.modalities, dropout=args.modality_dropout), seed=args.seed
    )
    train_dataloader = build_dataloader(
        raw_datasets["train"], train_collator, args.batch_size, shuffle=True, seed=args.seed
    )
    # One validation loader per condition: both modalities, and (for a two-modality model) each one alone.
    conditions = {"+".join(args.modalities): args.modalities}
    if len(args.modalities) == 2:
        conditions |= {f"{name}_only": [name] for name in args.modalities}
    eval_dataloaders = {
        name: build_dataloader(
            raw_datasets["validation"], PairCollator(processor, args, present), args.eval_batch_size, shuffle=False,
            seed=args.seed,
        )
        for name, present in conditions.items()
    }  # fmt: skip

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, eval_dataloaders)
    evaluators = {
        name: accuracy_evaluator(accelerator, prepared.model, loader)
        for name, loader in prepared.eval_dataloaders.items()
    }
    # Training evaluates the first condition (the modalities the model was trained on); the others come at the end.
    main_condition = next(iter(conditions))
    metrics = train(
        accelerator, args, prepared, evaluate_fn=evaluators[main_condition], processor=processor, checkpoint=checkpoint
    )
    results = {main_condition: metrics}
    for name in list(conditions)[1:]:
        results[name] = evaluators[name]()

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, processor)
    finish_run(accelerator, args, results, hub_repo_id)
    if accelerator.is_main_process:
        print("\nValidation accuracy:")
        for name, result in results.items():
            print(f"  {name}: {result['accuracy']:.4f} (loss {result['loss']:.4f})")


if __name__ == "__main__":
    main()
