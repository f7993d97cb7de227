"""Train a Perceiver IO optical flow model (DeepMind's architecture) with Accelerate, offline by default.

The model is DeepMind's Perceiver IO flow model at a small scale: the 3 x 3 patches of both frames at each pixel,
projected, plus 2D Fourier position features, one input position per pixel; one cross-attention layer and a block
of self-attention layers; the decoder queried by the input features; the output divided by 100:

    python examples/run_optical_flow.py --output_dir outputs/optical-flow

Data: with no data option, synthetic flow: crops (random position, scale 1-2.5) of the two photographs that
scikit-learn ships (`sklearn.datasets.load_sample_images()`, offline), the second frame the crop itself and the
first frame the photograph sampled at each pixel moved by a random smooth flow field (translation, affine part and
a smooth random field, at most ``--max_flow`` pixels), so the flow from the first frame to the second is known
exactly. Crops without texture (mean image gradient below ``--min_texture``: sky, dark background) are drawn again,
as their motion cannot be seen. Training crops come from the left 75% of both photographs, validation crops from
the right 25%, so validation pairs show unseen image content. ``--train_file`` / ``--validation_file`` (local files) or
``--dataset_name`` (a Hub dataset) take real flow data instead: two frame columns (images, or image file paths) and
a flow column (an `(H, W, 2)` array, an `(H, W, 3)` array whose last channel is the validity mask, or the path of a
``.flo`` / ``.npy`` file); frames are cropped to ``--image_size`` (random crops for training, central ones for
validation).

The loss is the mean end-point error (EPE); validation reports it beside the EPE of predicting zero flow. The final
model and its `PerceiverOpticalFlowProcessor` are saved with ``save_pretrained``, so
``pipeline("optical-flow", model=<output_dir>)`` loads them (after ``import perceiver_hf``); ``--picture`` writes a
PNG of validation pairs: first frame, ground truth and predicted flow as colour-wheel pictures.
``--checkpointing_steps`` and ``--resume_from_checkpoint`` let a run stop and continue exactly.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    BatchSeededCollator,
    add_layout_arguments,
    argument_group,
    build_dataloaders,
    build_parser,
    create_hub_repo,
    evaluate_model,
    find_checkpoint,
    finish_run,
    layout_config,
    load_raw_datasets,
    non_negative_float,
    parse_args,
    positive_float,
    positive_int,
    prepare_training,
    save_model,
    setup_accelerator,
    train,
)
from PIL import Image
from torch.utils.data import Dataset

# Importing perceiver_hf registers the perceiver_io model type and the optical-flow Auto class and pipeline.
from perceiver_hf import PerceiverConfig, PerceiverForOpticalFlow
from perceiver_hf.processing_optical_flow import PerceiverOpticalFlowProcessor, flow_to_color, read_flo

TRAIN_FRACTION = 0.75  # synthetic data: training crops from the left 75% of each photograph, validation the rest
MAX_CROP_ATTEMPTS = 100  # synthetic data: crops drawn per example before giving up on --min_texture


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    data = argument_group(parser, "data")
    data.add_argument("--first_frame_column", default="frame1", help="Column of the first frames (files, Hub).")
    data.add_argument("--second_frame_column", default="frame2", help="Column of the second frames (files, Hub).")
    data.add_argument(
        "--flow_column",
        default="flow",
        help="Column of the flows (files, Hub): (H, W, 2) arrays, (H, W, 3) with a validity mask, or .flo/.npy paths.",
    )
    synthetic = parser.add_argument_group("synthetic data (the default)")
    synthetic.add_argument(
        "--num_train_pairs", type=positive_int, default=100_000, help="Synthetic training pairs (made on the fly)."
    )
    synthetic.add_argument("--num_validation_pairs", type=positive_int, default=256, help="Synthetic validation pairs.")
    synthetic.add_argument(
        "--max_flow", type=positive_float, default=2.0, help="Largest synthetic flow vector, in pixels."
    )
    synthetic.add_argument(
        "--max_crop_scale",
        type=positive_float,
        default=2.5,
        help="Synthetic crops cover 1 to this many photograph pixels per frame pixel.",
    )
    synthetic.add_argument(
        "--min_texture",
        type=non_negative_float,
        default=0.05,
        help="Synthetic crops (training and validation) are redrawn until their mean image-gradient magnitude (on "
        "[-1, 1] pixels) reaches this: flat crops (sky, dark background, below ~0.02) show no motion. 0 keeps all.",
    )

    model = parser.add_argument_group("model (built from scratch)")
    model.add_argument(
        "--image_size",
        type=positive_int,
        nargs=2,
        default=[32, 48],
        metavar=("HEIGHT", "WIDTH"),
        help="Training size (crops of this size; the processor tiles larger frames with it).",
    )
    model.add_argument("--num_frequency_bands", type=positive_int, default=16, help="Fourier bands per axis.")
    model.add_argument(
        "--flow_projection_channels", type=positive_int, default=64, help="Width of the projection of the patches."
    )
    model.add_argument("--decoder_qk_channels", type=positive_int, default=64, help="Decoder query-key width.")
    model.add_argument(
        "--decoder_query_residual",
        action="store_true",
        help="Add the decoder's queries (each pixel's patch and position features) to its cross-attention output, so "
        "its MLP sees the pixel's own patches directly (DeepMind's flow decoder has no query residual).",
    )
    model.add_argument(
        "--flow_rescale_factor",
        type=positive_float,
        default=1.0,
        help="The decoder's output is divided by this. DeepMind's 100 suits its checkpoint's flow units (pixels / 20); "
        "for labels in pixels, 1 starts training far from the plateau of near-zero outputs.",
    )
    add_layout_arguments(model)
    model.add_argument(
        "--initializer_range",
        type=non_negative_float,
        default=0.1,
        help="config.initializer_range. 0.1 (not transformers' 0.02) puts the first layers' activations in their "
        "non-linear range, which computing motion from raw intensities (products of differences) needs.",
    )
    run = argument_group(parser, "run")
    run.add_argument(
        "--picture", default=None, help="Write a PNG of validation pairs: frame, ground truth, prediction."
    )
    parser.set_defaults(
        num_latents=64,
        d_latents=128,
        num_layers=1,
        num_self_attention_layers_per_block=4,
        num_cross_attention_heads=1,
        num_self_attention_heads=4,
        num_decoder_heads=1,
        widening_factor=1,
        output_dir="outputs/optical-flow",
        batch_size=16,
        learning_rate=1e-3,
        weight_decay=1e-4,
        dropout=0.0,
        max_steps=4000,
        eval_steps=500,
        logging_steps=50,
    )
    return parse_args(parser, argv)


# ---------------------------------------------------------------------------------------------- synthetic data


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `(C, H, W)`: the photographs are sampled at up to 2.5x reduction, blurring avoids aliasing."""
    radius = max(1, round(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(image[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out[:, 0]


def texture(frame: torch.Tensor) -> float:
    """Mean image-gradient magnitude of a `(3, H, W)` frame in [-1, 1]: the mean over pixels of the length of the
    grey image's forward differences (per pixel). Flat content (sky, a dark background) gives ~0.01 or less, where
    the motion cannot be seen."""
    grey = frame.mean(0)
    dx, dy = grey[:-1, 1:] - grey[:-1, :-1], grey[1:, :-1] - grey[:-1, :-1]
    return float(torch.sqrt(dx**2 + dy**2).mean())


def random_smooth_flow(rng: np.random.Generator, size: Sequence[int], max_flow: float) -> np.ndarray:
    """A random smooth flow field `(H, W, 2)` of at most `max_flow` pixels: a translation, an affine part (rotation,
    scaling, shear) and a smooth random field (a 3 x 4 grid of random vectors, bicubically interpolated)."""
    h, w = size
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    coords = np.stack([xs, ys], axis=-1)  # (H, W, 2), (x, y)
    translation = rng.uniform(-1, 1, 2) * max_flow * 0.7
    affine = rng.uniform(-1, 1, (2, 2)) * max_flow * 0.3
    coarse = torch.from_numpy(rng.normal(0, max_flow * 0.25, (1, 2, 3, 4)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0).numpy()
    flow = translation + coords @ affine.T + smooth
    largest = np.linalg.norm(flow, axis=-1).max()
    if largest > max_flow:
        flow *= max_flow / largest
    return flow.astype(np.float32)


def _sample(photo: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """Bilinear samples of a `(3, H', W')` photograph at `(H, W, 2)` photograph coordinates `(x, y)` -> `(3, H, W)`."""
    _, photo_h, photo_w = photo.shape
    grid = 2 * points / np.array([photo_w - 1, photo_h - 1]) - 1  # grid_sample's [-1, 1], align_corners
    grid = torch.from_numpy(grid.astype(np.float32))[None]  # (1, H, W, 2)
    return F.grid_sample(photo[None], grid, mode="bilinear", align_corners=True)[0]


class SyntheticFlowDataset(Dataset):
    """Frame pairs with known flow from real photographs warped by random smooth flow fields.

    Example `i` (always the same for the same `seed` and `i`): a photograph, a scale `s` in [1, `max_crop_scale`]
    and a crop position in the photograph's `region` (columns `[start, stop)` as fractions of its width); the second
    frame samples the photograph at `origin + s * p` for each pixel `p`; the first frame at `origin + s * (p + f(p))`
    for a random smooth flow `f` (`random_smooth_flow`), so pixel `p` of the first frame shows what pixel
    `p + f(p)` of the second shows, and `f` is the flow from the first frame to the second, exactly. With
    `min_texture` > 0, crops whose second frame has a mean image-gradient magnitude (`texture`) below it are drawn
    again (same random stream), so no pair is flat (sky, dark background) and motionless to the eye.

    Items: `{"pixel_values": (2, 3, H, W) in [-1, 1], "labels": (H, W, 2)}` (the processor's scaling).
    """

    def __init__(
        self,
        photographs: Sequence[np.ndarray],
        region: tuple[float, float],
        size: Sequence[int],
        num_pairs: int,
        max_flow: float,
        max_crop_scale: float = 2.5,
        seed: int = 0,
        min_texture: float = 0.0,
    ) -> None:
        self.photographs = [
            _blur(torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255.0, 0.8) for p in photographs
        ]
        self.region, self.size, self.num_pairs = region, tuple(size), num_pairs
        self.max_flow, self.max_crop_scale, self.seed = max_flow, max_crop_scale, seed
        self.min_texture = min_texture

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        h, w = self.size
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pixels = np.stack([xs, ys], axis=-1).astype(np.float32)  # (H, W, 2), (x, y)
        for _ in range(MAX_CROP_ATTEMPTS):  # draw crops until one has texture (the first one if min_texture is 0)
            photo = self.photographs[rng.integers(len(self.photographs))]
            _, photo_h, photo_w = photo.shape
            left, right = (round(f * photo_w) for f in self.region)
            scale = rng.uniform(1.0, self.max_crop_scale)
            margin = scale * self.max_flow + 2  # the first frame samples up to max_flow pixels outside the crop
            span_y, span_x = scale * (h - 1) + 2 * margin, scale * (w - 1) + 2 * margin
            if span_y > photo_h or span_x > right - left:
                raise ValueError(f"crops of {self.size} at scale {scale:.2f} do not fit the photograph region")
            origin_y = rng.uniform(0, photo_h - span_y) + margin
            origin = np.array([left + rng.uniform(0, right - left - span_x) + margin, origin_y])  # (x, y)
            second = _sample(photo, origin + scale * pixels)
            if self.min_texture == 0 or texture(second * 2 - 1) >= self.min_texture:
                break
        else:
            raise ValueError(
                f"no crop of the photographs' region {self.region} reached --min_texture {self.min_texture} in "
                f"{MAX_CROP_ATTEMPTS} attempts (example {index}); lower it"
            )
        flow = random_smooth_flow(rng, self.size, self.max_flow)  # (H, W, 2)
        first = _sample(photo, origin + scale * (pixels + flow))
        return {"pixel_values": torch.stack([first, second]) * 2 - 1, "labels": torch.from_numpy(flow)}


def synthetic_splits(args: argparse.Namespace) -> dict[str, Dataset]:
    from sklearn.datasets import load_sample_images  # examples-only dependency (the package never imports it)

    photographs = load_sample_images().images  # china.jpg and flower.jpg, 427 x 640
    common = dict(size=args.image_size, max_flow=args.max_flow, max_crop_scale=args.max_crop_scale,
                  min_texture=args.min_texture)  # fmt: skip
    return {
        "train": SyntheticFlowDataset(photographs, (0.0, TRAIN_FRACTION), num_pairs=args.num_train_pairs,
                                      seed=args.seed, **common),
        "validation": SyntheticFlowDataset(photographs, (TRAIN_FRACTION, 1.0), num_pairs=args.num_validation_pairs,
                                           seed=args.seed + 1, **common),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- file / Hub data


def _load_frame(value: Any) -> Any:
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # an undecoded datasets Image
        import io

        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return Image.open(value) if isinstance(value, (str, Path)) else value


def _load_flow(value: Any) -> np.ndarray:
    if isinstance(value, (str, Path)):
        return read_flo(value) if str(value).endswith(".flo") else np.load(value)
    return np.asarray(value, dtype=np.float32)


class FlowFileCollator:
    """Examples of two frame columns and a flow column -> `{"pixel_values", "labels"}` crops of the training size:
    random crops (from the torch RNG, which `BatchSeededCollator` seeds per batch) or central ones."""

    def __init__(self, processor: PerceiverOpticalFlowProcessor, args: argparse.Namespace, random_crop: bool) -> None:
        self.processor, self.random_crop = processor, random_crop
        self.columns = (args.first_frame_column, args.second_frame_column, args.flow_column)
        self.size = tuple(args.image_size)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values, labels = [], []
        first_column, second_column, flow_column = self.columns
        for i, example in enumerate(examples):
            pair = self.processor.frame_pair(_load_frame(example[first_column]), _load_frame(example[second_column]), i)
            flow = torch.from_numpy(_load_flow(example[flow_column]))
            if tuple(flow.shape[:2]) != tuple(pair.shape[-2:]) or flow.shape[-1] not in (2, 3):
                raise ValueError(
                    f"example {i}: flow of shape {tuple(flow.shape)} does not fit frames of "
                    f"{tuple(pair.shape[-2:])} pixels: expected (height, width, 2 or 3)"
                )
            if flow.shape[-1] == 2:  # pixels without ground truth (NaN) get a validity mask of 0
                valid = torch.isfinite(flow).all(-1, keepdim=True)
                flow = torch.cat([torch.nan_to_num(flow), valid.float()], dim=-1)
            height, width = pair.shape[-2:]
            h, w = self.size
            if height < h or width < w:
                raise ValueError(f"example {i}: frames of {(height, width)} pixels are smaller than --image_size")
            if self.random_crop:
                y = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
            else:
                y = (height - h) // 2, (width - w) // 2
            pixel_values.append(pair[..., y[0] : y[0] + h, y[1] : y[1] + w])
            labels.append(flow[y[0] : y[0] + h, y[1] : y[1] + w].float())
        return {"pixel_values": torch.stack(pixel_values), "labels": torch.stack(labels)}


# ---------------------------------------------------------------------------------------------- evaluation, pictures


def zero_flow_epe(dataset: Dataset) -> float:
    """Mean end-point error of predicting no motion: the mean flow magnitude (over valid pixels)."""
    total, count = 0.0, 0.0
    for i in range(len(dataset)):
        labels = dataset[i]["labels"]
        valid = labels[..., 2] if labels.shape[-1] == 3 else torch.ones(labels.shape[:2])
        total += float((torch.linalg.vector_norm(labels[..., :2], dim=-1) * valid).sum())
        count += float(valid.sum())
    return total / max(count, 1.0)


def save_flow_picture(model: PerceiverForOpticalFlow, dataset: Dataset, path: str | Path, num_pairs: int = 4) -> None:
    """A PNG with one row per validation pair: the first frame, the ground-truth flow and the predicted flow as
    colour-wheel pictures (one `max_flow` per row, so the two pictures of a row compare), each enlarged 4x."""
    model.eval()
    rows = []
    for i in range(min(num_pairs, len(dataset))):
        item = dataset[i]
        with torch.no_grad():
            predicted = model(pixel_values=item["pixel_values"][None]).logits[0]
        truth = item["labels"][..., :2]
        max_flow = float(torch.linalg.vector_norm(truth, dim=-1).max())
        frame = ((item["pixel_values"][0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        gap = np.full((frame.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([frame, gap, flow_to_color(truth, max_flow), gap,
                                    flow_to_color(predicted, max_flow)], axis=1))  # fmt: skip
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    picture = Image.fromarray(np.concatenate(rows[:-1]))
    picture = picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli(argv)
    accelerator = setup_accelerator(args)
    hub_repo_id = create_hub_repo(accelerator, args)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)

    # ------------------------------------------------------------------ model and processor
    config = PerceiverConfig(
        input_adapter="flow",
        flow_image_size=list(args.image_size),
        num_frequency_bands=args.num_frequency_bands,
        flow_projection_channels=args.flow_projection_channels,
        decoder_qk_channels=args.decoder_qk_channels,
        flow_rescale_factor=args.flow_rescale_factor,
        decoder_use_query_residual=True if args.decoder_query_residual else None,
        **layout_config(args),
        dropout=args.dropout,
        initializer_range=args.initializer_range,
    )
    model = PerceiverForOpticalFlow(config)
    processor = PerceiverOpticalFlowProcessor.from_perceiver_config(config, min_overlap=min(args.image_size) // 4)
    accelerator.print(f"Model: {sum(p.numel() for p in model.parameters()):,} parameters")

    # ------------------------------------------------------------------ data
    if args.dataset_name is None and args.train_file is None:
        splits: dict[str, Any] = synthetic_splits(args)
        train_collator = BatchSeededCollator(torch.utils.data.default_collate, seed=args.seed)
        eval_collator = torch.utils.data.default_collate
    else:
        splits = load_raw_datasets(args)
        for column in (args.first_frame_column, args.second_frame_column, args.flow_column):
            if column not in splits["train"].column_names:
                raise ValueError(
                    f"the training data has no column {column!r} (columns: {splits['train'].column_names})"
                )
        train_collator = BatchSeededCollator(FlowFileCollator(processor, args, random_crop=True), seed=args.seed)
        eval_collator = FlowFileCollator(processor, args, random_crop=False)
    train_dataloader, eval_dataloader = build_dataloaders(splits, args, train_collator, eval_collator)
    validation = splits["validation"]
    baseline = None
    if isinstance(validation, SyntheticFlowDataset):
        baseline = zero_flow_epe(validation)
        accelerator.print(f"Validation: {len(validation)} pairs, zero-flow EPE {baseline:.4f} px")

    # ------------------------------------------------------------------ optimizer, schedule, training
    prepared = prepare_training(accelerator, args, model, train_dataloader, {"validation": eval_dataloader})

    def evaluate_fn(step: int | None = None) -> dict[str, float]:
        results = evaluate_model(accelerator, prepared.model, prepared.eval_dataloaders["validation"])
        results["epe"] = results["loss"]
        if baseline is not None:
            results["zero_flow_epe"] = baseline
            results["epe_ratio"] = results["epe"] / baseline
        return results

    metrics = train(accelerator, args, prepared, evaluate_fn=evaluate_fn, processor=processor, checkpoint=checkpoint)

    # ------------------------------------------------------------------ save, share, show
    save_model(accelerator, prepared.model, args.output_dir, processor)
    finish_run(accelerator, args, metrics, hub_repo_id)
    if accelerator.is_main_process:
        print("\nValidation: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        if args.picture and isinstance(validation, SyntheticFlowDataset):
            save_flow_picture(accelerator.unwrap_model(prepared.model), validation, args.picture)
            print(f"Wrote {args.picture}: first frame | ground truth | prediction, per validation pair")


if __name__ == "__main__":
    main()
