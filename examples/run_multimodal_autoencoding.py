"""Train a Perceiver IO multimodal autoencoder: MNIST digits (one-frame videos), spoken digits (FSDD) and the label.

Each example is an MNIST image, a Free Spoken Digit Dataset clip of the same digit and the digit itself, paired as in
``run_multimodal_classification.py`` (whose data loading this script reuses). One
`PerceiverForMultimodalAutoencoding` reads all three (the image as 4 x 4 space-time patches, the audio as patches of
samples, the label one-hot), each with its own Fourier features and a learned per-modality padding, and reconstructs
all three from its latents, as DeepMind's Kinetics autoencoder does with video, audio and class:

    python examples/run_multimodal_autoencoding.py --mnist_dir ../shared/data/mnist --fsdd_dir ../shared/data/fsdd \\
        --output_dir outputs/mm-autoencoding

The label is replaced by a learned mask token for ``--label_mask_prob`` of the training examples (the collator draws
it, seeded per batch), so the model learns to fill it in: the evaluation masks it for every test pair and reports
the label accuracy ("classification by autoencoding"), with the reconstruction PSNR of the image and of the audio.
The last evaluation also decodes in chunks (``--eval_num_chunks``), checks the result against one-shot decoding, and
writes a few reconstructions a person can look at and listen to (``<output_dir>/samples``: PNG, WAV).
"""

from __future__ import annotations

import argparse
import json
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    BatchSeededCollator,
    build_dataloader,
    build_parser,
    create_hub_repo,
    encode_labels,
    find_checkpoint,
    finish_run,
    parse_args,
    positive_int,
    prepare_training,
    probability,
    save_model,
    setup_accelerator,
    train,
)
from run_audio_classification import decode_audio
from run_multimodal_classification import add_pair_arguments, check_pair_arguments, load_pairs

from perceiver_hf import (
    PerceiverConfig,
    PerceiverForMultimodalAutoencoding,
    PerceiverMultimodalAutoencodingProcessor,
)


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    add_pair_arguments(parser)
    model = parser.add_argument_group("model (built from scratch)")
    model.add_argument(
        "--audio_seconds", type=float, default=1.0, help="Clip length: shorter clips padded, longer cut."
    )
    model.add_argument("--audio_patch_size", type=positive_int, default=64, help="Audio samples per input position.")
    model.add_argument("--audio_output_patch_size", type=positive_int, default=16, help="Audio samples per query.")
    model.add_argument("--image_patch_size", type=positive_int, default=4, help="Pixels per input patch side.")
    model.add_argument("--image_freq_bands", type=positive_int, default=16, help="Fourier bands per image axis.")
    model.add_argument("--audio_freq_bands", type=positive_int, default=64, help="Fourier bands of the time axis.")
    model.add_argument("--num_latents", type=positive_int, default=64, help="Number of latent vectors.")
    model.add_argument("--d_latents", type=positive_int, default=128, help="Width of the latent vectors.")
    model.add_argument("--num_self_attention_layers", type=positive_int, default=4, help="Self-attention layers.")
    model.add_argument("--num_heads", type=positive_int, default=8, help="Heads of the latent self-attention.")
    model.add_argument("--widening_factor", type=positive_int, default=2, help="MLP widening factor.")
    model.add_argument("--label_query_channels", type=positive_int, default=64, help="Width of the label query.")
    model.add_argument("--output_channels", type=positive_int, default=128, help="Decoder output projection width.")
    model.add_argument("--image_loss_weight", type=float, default=10.0, help="Weight of the image MSE.")
    model.add_argument("--audio_loss_weight", type=float, default=10.0, help="Weight of the audio MSE.")
    model.add_argument("--label_loss_weight", type=float, default=0.5, help="Weight of the label cross-entropy.")
    model.add_argument(
        "--initializer_range", type=float, default=0.1, help="Standard deviation of the weight initialisation."
    )
    model.add_argument(
        "--label_mask_prob", type=probability, default=0.5, help="Training: probability of masking an example's label."
    )
    model.add_argument(
        "--train_output_fraction",
        type=probability,
        default=0.25,
        help="Training: fraction of the image and audio output points decoded per batch (random, as DeepMind trains "
        "on subsampled points); evaluation decodes all of them.",
    )
    model.add_argument("--eval_num_chunks", type=positive_int, default=4, help="Chunks of the final chunked decoding.")
    model.add_argument(
        "--num_samples", type=positive_int, default=4, help="Test pairs whose reconstructions are saved."
    )
    parser.set_defaults(
        output_dir="outputs/multimodal-autoencoding",
        batch_size=32,
        learning_rate=2e-3,
        weight_decay=1e-4,
        dropout=0.0,
        max_epochs=10,
        logging_steps=20,
        validation_split_percentage=20,
    )
    args = parse_args(parser, argv)
    check_pair_arguments(parser, args)
    return args


def build_config(args: argparse.Namespace, num_samples: int, label_names: list[str]) -> PerceiverConfig:
    p = args.image_patch_size
    if 28 % p or num_samples % args.audio_patch_size or num_samples % args.audio_output_patch_size:
        raise ValueError(
            f"--image_patch_size ({p}) must divide 28, and --audio_patch_size ({args.audio_patch_size}) and "
            f"--audio_output_patch_size ({args.audio_output_patch_size}) the clip length ({num_samples} samples)"
        )
    modalities = [
        {"name": "image", "channels": 1, "num_axes": 3, "num_freq_bands": args.image_freq_bands,
         "max_freq": [1.0, 28.0, 28.0], "patch_size": [1, p, p]},
        {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": args.audio_freq_bands,
         "max_freq": float(num_samples), "patch_size": args.audio_patch_size},
        {"name": "label", "channels": len(label_names), "num_axes": 1, "num_freq_bands": 0, "max_freq": 1.0,
         "one_hot": True, "mask_token": True, "mask_prob": args.label_mask_prob},
    ]  # fmt: skip
    outputs = [
        {"name": "image", "shape": [1, 28, 28], "loss_weight": args.image_loss_weight},
        {"name": "audio", "shape": [num_samples], "patch_size": args.audio_output_patch_size,
         "loss_weight": args.audio_loss_weight},
        {"name": "label", "query_channels": args.label_query_channels, "loss_weight": args.label_loss_weight},
    ]  # fmt: skip
    return PerceiverConfig(
        input_adapter="multimodal",
        modalities=modalities,
        modality_encoding="concat",
        modality_padding=4,
        autoencoding_outputs=outputs,
        autoencoding_output_channels=args.output_channels,
        num_latents=args.num_latents,
        d_latents=args.d_latents,
        num_self_attention_layers_per_block=args.num_self_attention_layers,
        num_cross_attention_heads=1,
        num_self_attention_heads=args.num_heads,
        num_decoder_heads=1,
        cross_attention_widening_factor=args.widening_factor,
        self_attention_widening_factor=args.widening_factor,
        decoder_widening_factor=args.widening_factor,
        dropout=args.dropout,
        initializer_range=args.initializer_range,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )


class AutoencodingCollator:
    """Examples -> `{"inputs", "labels", "masked"}`; the label is masked for `mask_prob` of the examples (torch RNG,
    which `BatchSeededCollator` seeds per batch), or for all of them with `mask_prob=1`. With `output_points`
    (`{modality: number of points of its query grid}`) and `output_fraction < 1`, a random subset of each modality's
    points is decoded (`output_points` in the batch)."""

    def __init__(
        self,
        processor: PerceiverMultimodalAutoencodingProcessor,
        args: argparse.Namespace,
        mask_prob: float,
        output_points: dict[str, int] | None = None,
        output_fraction: float = 1.0,
    ):
        self.processor, self.mask_prob = processor, mask_prob
        self.image_column, self.label_column = args.image_column, args.label_column
        self.output_points, self.output_fraction = output_points or {}, output_fraction

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor(
            images=[np.asarray(e[self.image_column]) for e in examples],
            audio=[np.asarray(e["input_values"], dtype=np.float32) for e in examples],
            labels=[e[self.label_column] for e in examples],
            return_targets=True,
        )
        masked = (
            torch.rand(len(examples)) < self.mask_prob
            if self.mask_prob < 1
            else torch.ones(len(examples), dtype=torch.bool)
        )
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        out = {"inputs": inputs, "labels": batch["labels"], "masked": {"label": masked}}
        if self.output_points and self.output_fraction < 1:
            out["output_points"] = {
                name: torch.randperm(n)[: max(1, round(n * self.output_fraction))].sort().values
                for name, n in self.output_points.items()
            }
        return out


def psnr(mse: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of a mean squared error (images in [0, 1], audio in [-1, 1]: peak 1)."""
    return 10 * torch.log10(peak**2 / mse.clamp(min=1e-12))


def autoencoding_evaluator(accelerator, model, dataloader):
    """An ``evaluate_fn`` for `train`: label masked for every pair; loss, per-modality MSE and PSNR (mean of the
    per-example PSNRs), label accuracy, and the baseline PSNRs of predicting the test set's mean image / silence."""

    def evaluate_fn(step: int | None = None) -> dict[str, float]:
        model.eval()
        if isinstance(dataloader.collate_fn, BatchSeededCollator):
            dataloader.collate_fn.set_epoch(0)
        sums: dict[str, list[torch.Tensor]] = {"image": [], "audio": [], "correct": [], "loss": [], "silence": []}
        images = []
        for batch in dataloader:
            with torch.no_grad():
                out = model(**batch)
            targets, recon = batch["labels"], out.reconstructions
            image_mse = ((recon["image"].clamp(0, 1) - targets["image"]) ** 2).flatten(1).mean(1)
            audio_mse = ((recon["audio"].clamp(-1, 1) - targets["audio"]) ** 2).mean(1)
            correct = (recon["label"].argmax(-1) == targets["label"]).float()
            gathered = accelerator.gather_for_metrics(
                (image_mse, audio_mse, correct, out.loss.repeat(len(correct)), (targets["audio"] ** 2).mean(1),
                 targets["image"].flatten(1))
            )  # fmt: skip
            for key, value in zip(("image", "audio", "correct", "loss", "silence"), gathered[:5], strict=True):
                sums[key].append(value.float())
            images.append(gathered[5].float())
        values = {key: torch.cat(v) for key, v in sums.items()}
        images = torch.cat(images)
        mean_image_mse = ((images - images.mean(0)) ** 2).mean(1)
        model.train()
        return {
            "loss": values["loss"].mean().item(),
            "label_accuracy": values["correct"].mean().item(),
            "image_mse": values["image"].mean().item(),
            "audio_mse": values["audio"].mean().item(),
            "image_psnr": psnr(values["image"]).mean().item(),
            "audio_psnr": psnr(values["audio"]).mean().item(),
            "baseline_mean_image_psnr": psnr(mean_image_mse).mean().item(),
            "baseline_silence_audio_psnr": psnr(values["silence"]).mean().item(),
        }

    return evaluate_fn


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV with the standard library (no extra dependency)."""
    pcm = (np.clip(samples, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def save_samples(model, processor, dataset, args, directory: Path, label_names: list[str]) -> dict[str, Any]:
    """Reconstruct the first test pairs (label masked) in `--eval_num_chunks` chunks; check the chunked result against
    one-shot decoding; write PNG (original | reconstruction) and WAV files and a summary."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    # The first pair of each digit in turn (the test split is sorted by speaker, then digit).
    labels = dataset[args.label_column]
    firsts = [labels.index(label) for label in sorted(set(labels))]
    examples = [dataset[i] for i in firsts[: args.num_samples]]
    batch = processor(
        images=[np.asarray(e[args.image_column]) for e in examples],
        audio=[np.asarray(e["input_values"], dtype=np.float32) for e in examples],
    )
    inputs = {name: value.to(model.device) for name, value in batch.items()}
    model.eval()
    chunked = model.reconstruct(inputs, num_chunks=args.eval_num_chunks)
    with torch.no_grad():
        one_shot = model(inputs=inputs).reconstructions
    chunk_diff = max((chunked[k] - one_shot[k]).abs().max().item() for k in chunked)
    raw = processor.post_process(chunked)
    summary = []
    for i, example in enumerate(examples):
        original = (inputs["image"][i, 0, :, :, 0].cpu().numpy() * 255).round().astype(np.uint8)
        recon = raw["image"][i, 0, :, :, 0]
        pair = np.concatenate([original, np.full((28, 2), 128, np.uint8), recon], axis=1)
        Image.fromarray(pair).resize((pair.shape[1] * 4, 28 * 4), Image.NEAREST).save(directory / f"pair{i}_image.png")
        write_wav(directory / f"pair{i}_audio_original.wav", inputs["audio"][i].cpu().numpy(), processor.sampling_rate)
        write_wav(directory / f"pair{i}_audio_reconstruction.wav", raw["audio"][i], processor.sampling_rate)
        summary.append({"pair": i, "label": label_names[example[args.label_column]],
                        "predicted_label": label_names[int(raw["label"][i])]})  # fmt: skip
    return {"chunked_vs_one_shot_max_abs_diff": chunk_diff, "samples": summary}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data (the classification script's pairs)
    raw_datasets = load_pairs(args)
    raw_datasets, label_names = encode_labels(raw_datasets, args.label_column)
    with accelerator.main_process_first():
        raw_datasets, sampling_rate = decode_audio(raw_datasets, args.audio_column)
    accelerator.print(raw_datasets)

    # ------------------------------------------------------------------ model and processor
    num_samples = round(args.audio_seconds * sampling_rate)
    config = build_config(args, num_samples, label_names)
    model = PerceiverForMultimodalAutoencoding(config)
    processor = PerceiverMultimodalAutoencodingProcessor(
        num_frames=1, image_size=(28, 28), num_channels=1, num_audio_samples=num_samples,
        sampling_rate=sampling_rate, num_labels=len(label_names),
    )  # fmt: skip
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()):,} parameters")
    grid_points = {name: spec.num_points for name, spec in model.output_specs.items() if not spec.one_hot}
    train_collator = BatchSeededCollator(
        AutoencodingCollator(processor, args, args.label_mask_prob, grid_points, args.train_output_fraction),
        seed=args.seed,
    )
    train_dataloader = build_dataloader(raw_datasets["train"], train_collator, args.batch_size, shuffle=True,
                                        seed=args.seed)  # fmt: skip
    eval_dataloader = build_dataloader(raw_datasets["validation"], AutoencodingCollator(processor, args, 1.0),
                                       args.eval_batch_size, shuffle=False, seed=args.seed)  # fmt: skip

    # ------------------------------------------------------------------ training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})
    evaluate_fn = autoencoding_evaluator(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=processor, checkpoint=checkpoint)

    # ------------------------------------------------------------------ save, show
    save_model(accelerator, prepared.model, args.output_dir, processor)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(prepared.model)
        samples_dir = Path(args.output_dir) / "samples"
        samples = save_samples(unwrapped, processor, raw_datasets["validation"], args, samples_dir, label_names)
        metrics = metrics | {"chunked_vs_one_shot_max_abs_diff": samples["chunked_vs_one_shot_max_abs_diff"]}
        (samples_dir / "samples.json").write_text(json.dumps(samples, indent=2))
    finish_run(accelerator, args, metrics, hub_repo_id)
    if accelerator.is_main_process:
        print("\nTest pairs (label masked):")
        for key, value in metrics.items():
            print(f"  {key}: {value:.4f}")


if __name__ == "__main__":
    main()
