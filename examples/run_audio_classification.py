"""Train a Perceiver IO audio classifier on raw waveforms with Accelerate (spoken digits by default).

The model reads the waveform directly: the audio input adapter groups ``--audio_patch_size`` samples per
input position, as raw samples or (the default) as the patch's log power spectrum, with Fourier position
features of the time axis; learned queries decode the latents into class logits:

    python examples/run_audio_classification.py --output_dir outputs/fsdd

Data: with no data option, the Free Spoken Digit Dataset sample shipped in ``examples/data`` (100 training
and 50 test clips, 8 kHz); ``--train_file`` / ``--validation_file`` take local files with an audio column
(``datasets`` ``Audio`` feature, or ``{"bytes", "path"}`` structs) and a label column. The full FSDD with its
official split (recordings 0-4 test) is ``../shared/data/fsdd/train.parquet`` and ``test.parquet``.
Audio is decoded with ``soundfile`` (``Audio(decode=False)``), so neither torchcodec nor FFmpeg is needed;
clips must all have one sampling rate (``--sampling_rate``, default: the first clip's).
`PerceiverFeatureExtractor` normalises each clip, cuts it to ``--max_audio_seconds`` and pads the batch;
``--augment`` adds random time shifts and background noise to training clips.

Validation accuracy goes through ``evaluate`` with the metric module shipped in ``examples/metrics``
(offline). The final model and feature extractor are saved with ``save_pretrained``, so
``pipeline("audio-classification", model=<output_dir>)`` classifies arrays and audio files. Watch a run
with ``tensorboard --logdir <output_dir>/runs``; ``--checkpointing_steps`` and ``--resume_from_checkpoint``
let a run stop and continue exactly.
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import soundfile as sf
import torch
from common import (
    EXAMPLES_DIR,
    BatchSeededCollator,
    accuracy_evaluator,
    add_layout_arguments,
    argument_group,
    build_dataloaders,
    build_parser,
    create_hub_repo,
    encode_labels,
    find_checkpoint,
    finish_run,
    label_config,
    layout_config,
    load_raw_datasets,
    non_negative_float,
    non_negative_int,
    parse_args,
    positive_float,
    positive_int,
    prepare_training,
    save_model,
    setup_accelerator,
    train,
)
from datasets import Audio, DatasetDict
from transformers import pipeline

# Importing perceiver_hf registers the perceiver_io model type and its feature extractor with the Auto classes.
from perceiver_hf import PerceiverConfig, PerceiverFeatureExtractor, PerceiverForAudioClassification

SAMPLE_DIR = EXAMPLES_DIR / "data"
# Default data: the shipped FSDD sample; train on train, validate on test.
SAMPLE_DATA_FILES = {
    "train": [str(SAMPLE_DIR / "fsdd_train.parquet")],
    "validation": [str(SAMPLE_DIR / "fsdd_test.parquet")],
}
HUB_SPLITS = {"train": "train", "validation": "test"}


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    argument_group(parser, "data").add_argument(
        "--audio_column", default="audio", help="Column holding the audio (an Audio feature or {bytes, path})."
    )

    audio = parser.add_argument_group("audio")
    audio.add_argument(
        "--sampling_rate",
        type=positive_int,
        default=None,
        help="Sampling rate (Hz) every clip must have; there is no resampling (default: the first clip's).",
    )
    audio.add_argument(
        "--max_audio_seconds",
        type=positive_float,
        default=None,
        help="Longest clip the model takes; longer clips are cut (default: the longest training clip).",
    )
    audio.add_argument(
        "--augment",
        action="store_true",
        help="Augment training clips: a random time shift (see --max_shift_seconds) and Gaussian background "
        "noise at a random signal-to-noise ratio (see --min_snr_db).",
    )
    audio.add_argument("--max_shift_seconds", type=non_negative_float, default=0.1, help="--augment: time shift.")
    audio.add_argument(
        "--min_snr_db", type=float, default=20.0, help="--augment: lowest signal-to-noise ratio of the added noise."
    )

    model = parser.add_argument_group("model (built from scratch)")
    model.add_argument(
        "--audio_patch_size", type=positive_int, default=128, help="Samples per input position (16 ms at 8 kHz)."
    )
    model.add_argument(
        "--audio_preprocessing",
        choices=("samples", "spectrogram"),
        default="spectrogram",
        help="Features of each patch: its raw samples, or its log power spectrum (patch_size // 2 + 1 bins).",
    )
    model.add_argument(
        "--audio_projection_channels",
        type=positive_int,
        default=None,
        help="Width of a linear projection of each patch's features (default: none).",
    )
    model.add_argument("--num_frequency_bands", type=positive_int, default=32, help="Fourier bands of the time axis.")
    add_layout_arguments(model)
    model.add_argument("--hidden_act", choices=("gelu", "geglu"), default="gelu", help="MLP activation.")
    model.add_argument(
        "--initializer_range",
        type=non_negative_float,
        default=0.1,
        help="Standard deviation of the weight initialisation. transformers' usual 0.02 suits wide models; with "
        "64-channel latents it leaves the initial attention nearly uniform and training plateaus (measured on "
        "FSDD: 55%% test accuracy after 4 epochs with 0.02, 93%% with 0.1).",
    )
    model.add_argument(
        "--attn_implementation", choices=("sdpa", "eager"), default="sdpa", help="Attention implementation."
    )
    model.add_argument(
        "--predict_samples",
        type=non_negative_int,
        default=5,
        help="Number of validation clips the saved model classifies at the end with pipeline('audio-classification').",
    )

    parser.set_defaults(
        d_latents=64,
        num_layers=1,
        num_self_attention_layers_per_block=4,
        num_cross_attention_heads=8,
        widening_factor=2,
        output_dir="outputs/audio-classification",
        batch_size=32,
        learning_rate=3e-3,
        weight_decay=1e-4,
        dropout=0.0,
        max_epochs=10,
        logging_steps=20,
    )
    return parse_args(parser, argv)


def decode_audio(raw: DatasetDict, audio_column: str) -> tuple[DatasetDict, int]:
    """Decode every clip with soundfile into a mono float32 `input_values` column; returns the sampling rate.

    Stereo clips are averaged to mono. All clips must share one sampling rate: there is no resampler without
    torchaudio, and a model trained at one rate misreads audio at another.
    """
    for split, dataset in raw.items():
        if audio_column not in dataset.column_names:
            raise ValueError(
                f"--audio_column {audio_column!r} is not a column of the {split} data "
                f"(columns: {', '.join(dataset.column_names)})"
            )
    if isinstance(raw["train"].features[audio_column], Audio):
        raw = raw.cast_column(audio_column, Audio(decode=False))

    def decode(batch: dict[str, list]) -> dict[str, list]:
        values, rates = [], []
        for item in batch[audio_column]:
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            clip, rate = sf.read(source, dtype="float32", always_2d=True)
            values.append(clip.mean(axis=1))
            rates.append(rate)
        return {"input_values": values, "sampling_rate": rates}

    decoded = raw.map(decode, batched=True, remove_columns=[audio_column], desc="Decoding audio")
    rates = {rate for split in decoded.values() for rate in split.unique("sampling_rate")}
    if len(rates) != 1:
        raise ValueError(f"the clips have several sampling rates {sorted(rates)}: resample them to one first")
    return decoded.remove_columns("sampling_rate"), rates.pop()


def build_config(args: argparse.Namespace, names: list[str]) -> PerceiverConfig:
    """An audio `PerceiverConfig` of the original Perceiver layout (`--num_layers` cross-attention layers)."""
    return PerceiverConfig(
        input_adapter="audio",
        sampling_rate=args.sampling_rate,
        max_audio_samples=args.max_audio_samples,
        audio_patch_size=args.audio_patch_size,
        audio_preprocessing=args.audio_preprocessing,
        audio_projection_channels=args.audio_projection_channels,
        num_frequency_bands=args.num_frequency_bands,
        **layout_config(args),
        hidden_act=args.hidden_act,
        dropout=args.dropout,
        **label_config(names),
        initializer_range=args.initializer_range,
        attn_implementation=args.attn_implementation,
    )


def augment_clip(clip: np.ndarray, sampling_rate: int, max_shift_seconds: float, min_snr_db: float) -> np.ndarray:
    """A random delay (leading silence) or advance (cut start) and Gaussian noise at a random SNR >= min_snr_db.

    Draws from the torch RNG, which `BatchSeededCollator` seeds per batch (exact resumes).
    """
    max_shift = int(max_shift_seconds * sampling_rate)
    if max_shift > 0:
        shift = int(torch.randint(-max_shift, max_shift + 1, ()).item())
        clip = np.concatenate([np.zeros(shift, dtype=clip.dtype), clip]) if shift >= 0 else clip[-shift:]
        if clip.size == 0:  # an advance past the end of a very short clip
            clip = np.zeros(1, dtype=np.float32)
    snr_db = min_snr_db + 20.0 * torch.rand(()).item()
    power = float(np.mean(clip**2)) + 1e-12
    noise = torch.randn(clip.shape[0]).numpy() * math.sqrt(power / 10 ** (snr_db / 10))
    return (clip + noise).astype(np.float32)


class AudioCollator:
    """Examples `{input_values, label}` -> `{"input_values", "attention_mask", "labels"}`, optionally augmented."""

    def __init__(self, feature_extractor: PerceiverFeatureExtractor, args: argparse.Namespace, augment: bool = False):
        self.feature_extractor = feature_extractor
        self.label_column = args.label_column
        self.augment = augment
        self.max_shift_seconds, self.min_snr_db = args.max_shift_seconds, args.min_snr_db

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rate = self.feature_extractor.sampling_rate
        clips = [np.asarray(example["input_values"], dtype=np.float32) for example in examples]
        if self.augment:
            clips = [augment_clip(clip, rate, self.max_shift_seconds, self.min_snr_db) for clip in clips]
        batch = self.feature_extractor(clips, sampling_rate=rate, return_tensors="pt")
        batch["labels"] = torch.tensor([example[self.label_column] for example in examples], dtype=torch.long)
        return dict(batch)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data
    raw_datasets = load_raw_datasets(args, default_data_files=SAMPLE_DATA_FILES, hub_splits=HUB_SPLITS)
    raw_datasets, label_names = encode_labels(raw_datasets, args.label_column)
    with accelerator.main_process_first():
        raw_datasets, sampling_rate = decode_audio(raw_datasets, args.audio_column)
    if args.sampling_rate is None:
        args.sampling_rate = sampling_rate
    elif args.sampling_rate != sampling_rate:
        raise ValueError(f"--sampling_rate is {args.sampling_rate} Hz but the clips are at {sampling_rate} Hz")
    if args.max_audio_seconds is None:
        longest = max(len(values) for values in raw_datasets["train"]["input_values"])
        args.max_audio_samples = longest
    else:
        args.max_audio_samples = math.ceil(args.max_audio_seconds * args.sampling_rate)
    accelerator.print(raw_datasets)
    accelerator.print(
        f"Classes: {label_names}; {args.sampling_rate} Hz, clips cut to {args.max_audio_samples} samples "
        f"({args.max_audio_samples / args.sampling_rate:.2f} s)"
    )

    # ------------------------------------------------------------------ model and feature extractor
    config = build_config(args, label_names)
    model = PerceiverForAudioClassification(config)
    feature_extractor = PerceiverFeatureExtractor.from_perceiver_config(config)
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()):,} parameters")

    train_collator = BatchSeededCollator(AudioCollator(feature_extractor, args, augment=args.augment), seed=args.seed)
    eval_collator = AudioCollator(feature_extractor, args)
    train_dataloader, eval_dataloader = build_dataloaders(raw_datasets, args, train_collator, eval_collator)

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})
    evaluate_fn = accuracy_evaluator(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
    metrics = train(
        accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=feature_extractor, checkpoint=checkpoint
    )

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, feature_extractor)
    finish_run(accelerator, args, metrics, hub_repo_id)

    if accelerator.is_main_process:
        print(f"\nValidation: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
        if args.predict_samples:
            # Load the saved model the way users will, to show that it works end to end.
            classifier = pipeline("audio-classification", model=args.output_dir)
            validation = raw_datasets["validation"]
            samples = validation.select(range(min(args.predict_samples, len(validation))))
            print(f"Predictions of pipeline('audio-classification', model={args.output_dir!r}):")
            for example in samples:
                clip = np.asarray(example["input_values"], dtype=np.float32)
                top = classifier({"array": clip, "sampling_rate": args.sampling_rate}, top_k=1)[0]
                true = label_names[example[args.label_column]]
                print(f"  true {true}: predicted {top['label']} ({top['score']:.3f})")


if __name__ == "__main__":
    main()
