"""Train a Perceiver IO image classifier from scratch with Accelerate (MNIST by default).

The model is the original Perceiver IO project's MNIST classifier by default: pixels with 2D Fourier
position features, a 32 x 128 latent array, 3 cross-attention layers each followed by a block of 3
self-attention layers (layers 2-3 sharing weights), one learned output query (about 0.9M parameters):

    python examples/run_image_classification.py --output_dir outputs/mnist

Data: with no data option, the MNIST sample shipped in ``examples/data`` (1,000 training and 200 test
images); ``--train_file`` / ``--validation_file`` take local files (the full MNIST:
``../shared/data/mnist/train.parquet`` and ``test.parquet``); ``--image_folder`` an image folder in the
``imagefolder`` layout (``<dir>/<split>/<class name>/<image>``); ``--dataset_name mnist`` the Hub dataset.
Images are resized and normalised by `PerceiverImageProcessor`, optionally augmented (``--augment``:
small random rotations, scalings and shifts computed in torch on the batch). Class names come from the
label column (a `ClassLabel`, or the sorted label values) and become the model's ``id2label``.

Validation accuracy goes through ``evaluate`` with the metric module shipped in ``examples/metrics``
(offline). The final model and image processor are saved with ``save_pretrained``, so
``pipeline("image-classification", model=<output_dir>)`` loads them. ``--model_api original`` trains the
same classifier built with krasserm's original model API (``perceiver_hf.perceiver``:
``PerceiverIO(PerceiverEncoder(ImageInputAdapter(...)), PerceiverDecoder(ClassificationOutputAdapter(...)))``)
and saves its weights as ``model.safetensors`` plus the arguments that rebuild it
(``model_api_original.json``). Watch a run with ``tensorboard --logdir <output_dir>/runs``;
``--checkpointing_steps`` and ``--resume_from_checkpoint`` let a run stop and continue exactly.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    EXAMPLES_DIR,
    BatchSeededCollator,
    accuracy_evaluator,
    add_layout_arguments,
    argument_group,
    build_dataloaders,
    build_parser,
    check_training_column,
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
    positive_int,
    prepare_training,
    save_model,
    setup_accelerator,
    split_and_limit,
    train,
)
from datasets import DatasetDict, Image, load_dataset
from safetensors.torch import save_model as save_safetensors
from torch import nn
from transformers import pipeline
from transformers.modeling_outputs import ImageClassifierOutput

# Importing perceiver_hf registers the perceiver_io model type and its image processor with the Auto classes.
from perceiver_hf import PerceiverConfig, PerceiverForImageClassification, PerceiverImageProcessor
from perceiver_hf.perceiver.adapter import ClassificationOutputAdapter, ImageInputAdapter
from perceiver_hf.perceiver.model import PerceiverDecoder, PerceiverEncoder, PerceiverIO

SAMPLE_DIR = EXAMPLES_DIR / "data"
# Default data: the shipped MNIST sample; train on train, validate on test.
SAMPLE_DATA_FILES = {
    "train": [str(SAMPLE_DIR / "mnist_train.parquet")],
    "validation": [str(SAMPLE_DIR / "mnist_test.parquet")],
}
# The same splits of the Hub's "mnist" dataset.
HUB_SPLITS = {"train": "train", "validation": "test"}
ORIGINAL_API_FILE = "model_api_original.json"


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    data = argument_group(parser, "data")
    data.add_argument(
        "--image_folder",
        default=None,
        help="A local folder loaded with the `imagefolder` builder: <dir>/<split>/<class name>/<image files>; its "
        "'validation' (or else 'test') split validates. Instead of --train_file / --dataset_name.",
    )
    data.add_argument(
        "--image_column", default="image", help="Column holding the images (PIL images or encoded image bytes)."
    )

    images = parser.add_argument_group("images")
    images.add_argument(
        "--image_size",
        type=positive_int,
        nargs=2,
        default=None,
        metavar=("HEIGHT", "WIDTH"),
        help="Resize images to this size (default: the size of the first training image).",
    )
    images.add_argument(
        "--num_channels",
        type=positive_int,
        choices=(1, 3),
        default=None,
        help="1 converts images to grayscale, 3 to RGB (default: 1 if the first training image is grayscale).",
    )
    images.add_argument(
        "--augment",
        action="store_true",
        help="Augment training images with a random affine transform per image (see --max_rotation, "
        "--max_scale, --max_shift), computed in torch on the batch.",
    )
    images.add_argument("--max_rotation", type=non_negative_float, default=10.0, help="--augment: degrees.")
    images.add_argument(
        "--max_scale", type=non_negative_float, default=0.1, help="--augment: relative zoom, e.g. 0.1 for 0.9-1.1."
    )
    images.add_argument(
        "--max_shift", type=non_negative_float, default=0.1, help="--augment: fraction of the image size."
    )

    model = parser.add_argument_group("model (built from scratch)")
    model.add_argument(
        "--model_api",
        choices=("hf", "original"),
        default="hf",
        help="'hf': PerceiverForImageClassification from a PerceiverConfig (save_pretrained, pipelines). "
        "'original': the same classifier built with krasserm's original model API (perceiver_hf.perceiver).",
    )
    model.add_argument("--num_frequency_bands", type=positive_int, default=32, help="Fourier bands per axis.")
    model.add_argument(
        "--image_preprocessing",
        choices=("pixels", "patches", "conv"),
        default="pixels",
        help="Encoder inputs: pixels, space-to-depth patches, or DeepMind's conv + max-pool stem.",
    )
    model.add_argument(
        "--spatial_downsample",
        type=positive_int,
        default=None,
        help="Patch size ('patches'), 4 ** layers ('conv'), or pixel stride ('pixels').",
    )
    model.add_argument(
        "--image_projection_channels",
        type=positive_int,
        default=None,
        help="Linear projection width of pixels/patches, or the conv stem's channels.",
    )
    model.add_argument(
        "--image_position_encoding", choices=("fourier", "learned"), default="fourier", help="Position features."
    )
    add_layout_arguments(model)
    model.add_argument(
        "--initializer_range",
        type=non_negative_float,
        default=0.02,
        help="Standard deviation of the weight initialisation (config.initializer_range). Larger values make the "
        "initial attention less uniform, which shortens the plateau at the start of training from scratch.",
    )
    model.add_argument(
        "--attn_implementation", choices=("sdpa", "eager"), default="sdpa", help="Attention implementation."
    )
    model.add_argument(
        "--predict_samples",
        type=non_negative_int,
        default=5,
        help="Number of validation images the saved model classifies at the end with pipeline('image-classification').",
    )

    # Defaults for a small classifier trained from scratch (no dropout, light weight decay), and the layout of
    # the original project's MNIST classifier.
    parser.set_defaults(
        d_latents=128,
        num_layers=3,
        num_self_attention_layers_per_block=3,
        num_cross_attention_heads=4,
        widening_factor=1,
        output_dir="outputs/image-classification",
        batch_size=64,
        learning_rate=1e-3,
        weight_decay=1e-4,
        dropout=0.0,
        max_epochs=3,
        logging_steps=20,
    )
    args = parse_args(parser, argv)
    if args.image_folder is not None:
        if args.train_file is not None or args.dataset_name is not None:
            parser.error("give only one of --image_folder, --train_file and --dataset_name")
        if not Path(args.image_folder).is_dir():
            parser.error(f"argument --image_folder: no folder at {args.image_folder!r}")
    return args


def load_images(args: argparse.Namespace) -> DatasetDict:
    """The train and validation splits from --image_folder, or else as `load_raw_datasets` finds them."""
    if args.image_folder is None:
        return load_raw_datasets(args, default_data_files=SAMPLE_DATA_FILES, hub_splits=HUB_SPLITS)
    folder = load_dataset("imagefolder", data_dir=args.image_folder)
    raw = DatasetDict({"train": folder["train"]})
    for split in ("validation", "test"):
        if split in folder:
            raw["validation"] = folder[split]
            break
    return split_and_limit(raw, args)


def build_config(args: argparse.Namespace, names: list[str]) -> PerceiverConfig:
    """A `PerceiverConfig` of the original Perceiver layout (`--num_layers` cross-attention layers)."""
    return PerceiverConfig(
        input_adapter="image",
        image_size=list(args.image_size),
        num_channels=args.num_channels,
        num_frequency_bands=args.num_frequency_bands,
        image_position_encoding=args.image_position_encoding,
        image_preprocessing=args.image_preprocessing,
        spatial_downsample=args.spatial_downsample,
        image_projection_channels=args.image_projection_channels,
        **layout_config(args),
        num_output_queries=1,
        dropout=args.dropout,
        **label_config(names),
        initializer_range=args.initializer_range,
        attn_implementation=args.attn_implementation,
    )


class OriginalAPIClassifier(nn.Module):
    """A `PerceiverIO` built with krasserm's original model API (`perceiver_hf.perceiver`, his README's MNIST
    classifier), with the HF-style `forward(pixel_values, labels)` that the shared training loop calls.

    His API has pixels with Fourier features, MLPs of widening factor 1 and one attention implementation; the
    other image options belong to `--model_api hf`. `arguments` (a JSON-able dict) rebuilds the same module:
    `OriginalAPIClassifier(**arguments)`.
    """

    def __init__(self, **arguments: Any) -> None:
        super().__init__()
        self.arguments = arguments
        a = arguments
        latent_shape = (a["num_latents"], a["d_latents"])
        input_adapter = ImageInputAdapter(
            image_shape=(*a["image_size"], a["num_channels"]), num_frequency_bands=a["num_frequency_bands"]
        )
        output_adapter = ClassificationOutputAdapter(num_classes=a["num_classes"], num_output_channels=a["d_latents"])
        encoder = PerceiverEncoder(
            input_adapter=input_adapter,
            latent_shape=latent_shape,
            num_layers=a["num_layers"],
            num_cross_attention_heads=a["num_cross_attention_heads"],
            num_self_attention_heads=a["num_self_attention_heads"],
            num_self_attention_layers_per_block=a["num_self_attention_layers_per_block"],
            dropout=a["dropout"],
        )
        decoder = PerceiverDecoder(
            output_adapter=output_adapter,
            latent_shape=latent_shape,
            num_cross_attention_heads=a["num_decoder_heads"],
            dropout=a["dropout"],
        )
        self.perceiver_io = PerceiverIO(encoder, decoder)

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_classes: int) -> OriginalAPIClassifier:
        unsupported = {
            "--image_preprocessing": (args.image_preprocessing, "pixels"),
            "--image_position_encoding": (args.image_position_encoding, "fourier"),
            "--widening_factor": (args.widening_factor, 1),
        }
        for option, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"{option} {value} is not in krasserm's original model API (--model_api original takes "
                    f"{supported}); use --model_api hf"
                )
        names = (
            "image_size", "num_channels", "num_frequency_bands", "num_latents", "d_latents", "num_layers",
            "num_cross_attention_heads", "num_self_attention_heads", "num_self_attention_layers_per_block",
            "num_decoder_heads", "dropout",
        )  # fmt: skip
        return cls(num_classes=num_classes, **{name: getattr(args, name) for name in names})

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.perceiver_io(pixel_values.permute(0, 2, 3, 1))  # his adapter takes channels-last (B, H, W, C)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save(self, output_dir: str | Path, id2label: dict[int, str]) -> None:
        """Weights as `model.safetensors` (shared weights stored once), arguments and labels as JSON."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors(self, str(output_dir / "model.safetensors"))
        meta = {"arguments": self.arguments, "id2label": {str(k): v for k, v in id2label.items()}}
        (output_dir / ORIGINAL_API_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def random_affine(pixel_values: torch.Tensor, max_rotation: float, max_scale: float, max_shift: float) -> torch.Tensor:
    """A random rotation (degrees), zoom and shift (fraction of the size) per image of `(B, C, H, W)`.

    Border pixels are repeated into the uncovered area (MNIST's background is its border). Draws from
    the global torch RNG, which `BatchSeededCollator` seeds per batch.
    """
    b = pixel_values.shape[0]
    angle = (torch.rand(b) * 2 - 1) * math.radians(max_rotation)
    scale = 1 + (torch.rand(b) * 2 - 1) * max_scale
    shift = (torch.rand(b, 2) * 2 - 1) * 2 * max_shift  # grid coordinates span 2 per image side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ImageCollator:
    """Examples `{image, label}` -> `{"pixel_values": (B, C, H, W), "labels": (B,)}`, optionally augmented."""

    def __init__(self, processor: PerceiverImageProcessor, args: argparse.Namespace, augment: bool = False) -> None:
        self.processor = processor
        self.image_column = args.image_column
        self.label_column = args.label_column
        self.augment = augment
        self.max_rotation, self.max_scale, self.max_shift = args.max_rotation, args.max_scale, args.max_shift

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [example[self.image_column] for example in examples]
        pixel_values = self.processor(images, return_tensors="pt")["pixel_values"]
        if self.augment:
            pixel_values = random_affine(pixel_values, self.max_rotation, self.max_scale, self.max_shift)
        labels = torch.tensor([example[self.label_column] for example in examples], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ data
    raw_datasets = load_images(args)
    check_training_column(raw_datasets, "--image_column", args.image_column)
    if not isinstance(raw_datasets["train"].features[args.image_column], Image):
        # Paths or encoded bytes (e.g. a csv of file names): decode them as images.
        raw_datasets = raw_datasets.cast_column(args.image_column, Image())
    raw_datasets, label_names = encode_labels(raw_datasets, args.label_column)
    first_image = raw_datasets["train"][0][args.image_column]
    if args.image_size is None:
        args.image_size = [first_image.height, first_image.width]
    if args.num_channels is None:
        args.num_channels = 1 if first_image.mode in ("1", "L", "I", "I;16", "F") else 3
    accelerator.print(raw_datasets)
    accelerator.print(f"Classes: {label_names}; images resized to {args.image_size}, {args.num_channels} channel(s)")

    # ------------------------------------------------------------------ model and image processor
    config = build_config(args, label_names)  # validates the model options, also for --model_api original
    if args.model_api == "hf":
        model: nn.Module = PerceiverForImageClassification(config)
    else:
        model = OriginalAPIClassifier.from_args(args, len(label_names))
    processor = PerceiverImageProcessor.from_perceiver_config(config)
    accelerator.print(f"Model ({args.model_api} API): {sum(p.numel() for p in model.parameters()):,} parameters")

    train_collator = BatchSeededCollator(ImageCollator(processor, args, augment=args.augment), seed=args.seed)
    eval_collator = ImageCollator(processor, args)
    train_dataloader, eval_dataloader = build_dataloaders(raw_datasets, args, train_collator, eval_collator)

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})
    evaluate_fn = accuracy_evaluator(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=processor, checkpoint=checkpoint)

    # ------------------------------------------------------------------ save, share, show
    if args.model_api == "hf":
        save_model(accelerator, prepared.model, args.output_dir, processor)
    elif accelerator.is_main_process:
        accelerator.unwrap_model(prepared.model).save(args.output_dir, config.id2label)
        processor.save_pretrained(args.output_dir)
    finish_run(accelerator, args, metrics, hub_repo_id)

    if accelerator.is_main_process:
        print(f"\nValidation: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
        if args.model_api == "hf" and args.predict_samples:
            # Load the saved model the way users will, to show that it works end to end.
            classifier = pipeline("image-classification", model=args.output_dir)
            validation = raw_datasets["validation"]
            samples = validation.select(range(min(args.predict_samples, len(validation))))
            print(f"Predictions of pipeline('image-classification', model={args.output_dir!r}):")
            for example in samples:
                top = classifier(example[args.image_column], top_k=1)[0]
                true = label_names[example[args.label_column]]
                print(f"  true {true}: predicted {top['label']} ({top['score']:.3f})")


if __name__ == "__main__":
    main()
