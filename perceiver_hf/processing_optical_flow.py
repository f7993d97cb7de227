"""Optical flow processing: frame pairs -> model inputs, tiled inference, and flow -> colour pictures.

- `PerceiverOpticalFlowProcessor`: frame pairs (PIL images, NumPy arrays or tensors, of any size) -> `pixel_values`
  `(B, 2, C, H, W)` scaled to [-1, 1] as DeepMind's flow model expects; `predict_flow` runs a model on frames larger
  than its training size over overlapping tiles of that size and blends the tiles' flows with weights that fall off
  towards each tile's border, as DeepMind's evaluation does (`tile_positions`, `tile_weights`).
- `flow_to_color`: the standard Middlebury colour-wheel picture of a flow field (Baker et al., "A Database and
  Evaluation Methodology for Optical Flow"): hue is the direction, saturation the magnitude.
- `read_flo` / `write_flo`: Middlebury `.flo` files, the format of the usual flow datasets (Sintel, FlyingChairs).

Shapes: B batch, H x W pixels, C channels; flows are `(H, W, 2)`, `(dx, dy)` in pixels per pixel of the first frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin

__all__ = [
    "PerceiverOpticalFlowProcessor",
    "flow_to_color",
    "make_color_wheel",
    "tile_positions",
    "tile_weights",
    "read_flo",
    "write_flo",
]

_FLO_MAGIC = 202021.25  # the tag of Middlebury .flo files ("PIEH" as a float32)


def make_color_wheel() -> np.ndarray:
    """The Middlebury colour wheel: `(55, 3)` RGB values in [0, 255] around the hue circle, in segments from red
    over yellow, green, cyan, blue and magenta back to red (15, 6, 4, 11, 13 and 6 steps, spaced by perceptual
    difference, as Baker et al.'s `colorcode.cpp`)."""
    red, yellow, green, cyan, blue, magenta = (
        (255, 0, 0),
        (255, 255, 0),
        (0, 255, 0),
        (0, 255, 255),
        (0, 0, 255),
        (255, 0, 255),
    )
    segments = [(15, red, yellow), (6, yellow, green), (4, green, cyan), (11, cyan, blue), (13, blue, magenta),
                (6, magenta, red)]  # fmt: skip
    rows = []
    for steps, start, end in segments:
        t = np.arange(steps)[:, None] / steps  # (steps, 1)
        rows.append(np.asarray(start) * (1 - t) + np.asarray(end) * t)
    return np.floor(np.concatenate(rows)).astype(np.float64)


def flow_to_color(flow: np.ndarray | torch.Tensor, max_flow: float | None = None) -> np.ndarray:
    """Colour-code a flow field `(H, W, 2)` (`(dx, dy)` per pixel) as a `(H, W, 3)` uint8 RGB picture.

    The direction picks the hue on the Middlebury colour wheel (right: red, down: green-yellow, left: cyan, up:
    blue-purple), the magnitude the saturation: white is no motion, full colour is `max_flow` (default: the largest
    magnitude in `flow`, so a picture uses the whole range; give the same `max_flow` to compare two pictures).
    Vectors longer than `max_flow` are darkened; unknown (NaN or huge) vectors are black.
    """
    flow = flow.detach().cpu().numpy() if torch.is_tensor(flow) else np.asarray(flow)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must have shape (height, width, 2), got {flow.shape}")
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    unknown = ~np.isfinite(u) | ~np.isfinite(v) | (np.abs(u) > 1e9) | (np.abs(v) > 1e9)
    u, v = np.where(unknown, 0.0, u), np.where(unknown, 0.0, v)
    magnitude = np.hypot(u, v)
    if max_flow is None:
        max_flow = float(magnitude.max())
    if not max_flow > 0:
        max_flow = 1.0  # a zero flow field: every pixel white
    u, v, magnitude = u / max_flow, v / max_flow, magnitude / max_flow

    wheel = make_color_wheel()
    num_colors = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (num_colors - 1)  # fractional index on the wheel
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % num_colors
    f = (position - k0)[..., None]
    color = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255.0  # (H, W, 3) in [0, 1]
    inside = (magnitude <= 1)[..., None]
    # Saturation grows with the magnitude (white at 0); beyond max_flow the colour is darkened instead.
    color = np.where(inside, 1 - magnitude[..., None] * (1 - color), color * 0.75)
    color[unknown] = 0.0
    return np.floor(255 * color).astype(np.uint8)


def tile_positions(image_size: Sequence[int], tile_size: Sequence[int], min_overlap: int) -> list[tuple[int, int]]:
    """Top-left corners `(y, x)` of tiles of `tile_size` covering `image_size`, overlapping by at least `min_overlap`
    pixels, the last row and column flush with the image border (DeepMind's `compute_grid_indices`)."""
    corners = []
    for size, tile in zip(image_size, tile_size, strict=True):
        if size <= tile:
            corners.append([0])
            continue
        if min_overlap >= tile:
            raise ValueError(f"min_overlap ({min_overlap}) must be smaller than the tile size {tuple(tile_size)}")
        starts = list(range(0, size - tile, tile - min_overlap)) + [size - tile]
        corners.append(sorted(set(starts)))
    return list(itertools.product(*corners))


def tile_weights(tile_size: Sequence[int]) -> np.ndarray:
    """Blending weights `(h, w)` of a tile: 1 + the distance to the nearest tile border (DeepMind's), so that where
    tiles overlap, each pixel's flow comes mostly from the tile it is deepest inside."""
    h, w = tile_size
    wy = np.minimum(np.arange(h) + 1, h - np.arange(h))
    wx = np.minimum(np.arange(w) + 1, w - np.arange(w))
    return np.minimum(wy[:, None], wx[None, :]).astype(np.float32)


def read_flo(path: str | Path) -> np.ndarray:
    """Read a Middlebury `.flo` file -> `(H, W, 2)` float32 flow."""
    with open(path, "rb") as file:
        magic = np.fromfile(file, np.float32, count=1)
        if magic.size != 1 or magic[0] != _FLO_MAGIC:
            raise ValueError(f"{path} is not a .flo file (its first 4 bytes are not the tag {_FLO_MAGIC})")
        width, height = (int(n) for n in np.fromfile(file, np.int32, count=2))
        data = np.fromfile(file, np.float32, count=2 * width * height)
    if data.size != 2 * width * height:
        raise ValueError(f"{path} is truncated: {data.size} of {2 * width * height} flow values")
    return data.reshape(height, width, 2)


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write a `(H, W, 2)` flow as a Middlebury `.flo` file."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must have shape (height, width, 2), got {flow.shape}")
    with open(path, "wb") as file:
        np.asarray([_FLO_MAGIC], np.float32).tofile(file)
        np.asarray([flow.shape[1], flow.shape[0]], np.int32).tofile(file)
        flow.tofile(file)


class PerceiverOpticalFlowProcessor(ImageProcessingMixin):
    """Frame pairs -> `pixel_values` `(B, 2, C, H, W)` for `PerceiverForOpticalFlow`, and tiled flow prediction.

    Frames may be PIL images, NumPy arrays or tensors, `(H, W, C)` or `(C, H, W)` (or `(H, W)` grey, with
    `num_channels=1`). Integer pixels (and PIL images) are in [0, 255], float pixels in [0, 1]; both are mapped to
    [-1, 1] (DeepMind's `im / 255 * 2 - 1`). Frames keep their size: the model takes any size, and `predict_flow`
    tiles frames larger than `tile_size`.

    Args:
        tile_size: the model's training size `(height, width)` (`config.flow_image_size`).
        min_overlap: least overlap of neighbouring tiles, in pixels (DeepMind: 20).
        num_channels: channels of each frame (grey frames are repeated to 3 channels when 3 are expected).
        flow_scale_factor: the model's flow is multiplied by this to give pixels (DeepMind's checkpoint: 20,
            its `FLOW_SCALE_FACTOR`; models trained on flows in pixels: 1).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        tile_size: Sequence[int] = (368, 496),
        min_overlap: int = 20,
        num_channels: int = 3,
        flow_scale_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tile_size = [int(n) for n in tile_size]
        self.min_overlap = int(min_overlap)
        self.num_channels = int(num_channels)
        self.flow_scale_factor = float(flow_scale_factor)
        if len(self.tile_size) != 2 or min(self.tile_size) < 1:
            raise ValueError(f"tile_size ({list(tile_size)}) must be two positive integers (height, width)")
        if not 0 <= self.min_overlap < min(self.tile_size):
            raise ValueError(f"min_overlap ({min_overlap}) must be in [0, {min(self.tile_size)}) (the tile size)")

    @classmethod
    def from_perceiver_config(cls, config: Any, **kwargs: Any) -> PerceiverOpticalFlowProcessor:
        """The processor of a flow model's config: its training size and channels (tiles overlap by 20 pixels, as
        DeepMind's, or a quarter of the smaller side of smaller tiles)."""
        kwargs.setdefault("min_overlap", min(20, min(config.flow_image_size) // 4))
        return cls(tile_size=list(config.flow_image_size), num_channels=config.num_channels, **kwargs)

    # ----------------------------------------------------------------------------------------- inputs

    def to_frame(self, image: Any, name: str = "frame") -> torch.Tensor:
        """One frame -> a float32 `(C, H, W)` tensor in [-1, 1]."""
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            image = image.convert("RGB" if self.num_channels == 3 else "L")
            array = torch.from_numpy(np.array(image))
        elif isinstance(image, np.ndarray):
            array = torch.from_numpy(np.ascontiguousarray(image))
        elif torch.is_tensor(image):
            array = image.detach().cpu()
        else:
            raise ValueError(f"{name} must be a PIL image, a NumPy array or a tensor, got {type(image).__name__}")
        c = self.num_channels
        if array.ndim == 2:
            array = array[None]  # grey (H, W)
        if array.ndim != 3:
            raise ValueError(
                f"{name} must have shape (height, width, {c}) or ({c}, height, width), got {tuple(array.shape)}"
            )
        shape = tuple(array.shape)
        if array.shape[0] not in (1, c):
            if array.shape[-1] not in (1, c):
                raise ValueError(
                    f"{name} of shape {shape} has no axis of {c} channels (num_channels) first or last; expected "
                    f"(height, width, {c}) or ({c}, height, width)"
                )
            array = array.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if array.shape[0] == 1 and c != 1:
            array = array.expand(c, -1, -1)  # grey frames for a colour model
        frame = array.float() if array.is_floating_point() else array.float() / 255.0
        return frame * 2.0 - 1.0

    def _pairs(self, frames: Any) -> list[tuple[Any, Any]]:
        if isinstance(frames, dict):
            frames = (frames.get("first"), frames.get("second"))
        if isinstance(frames, (tuple, list)) and len(frames) == 2 and not isinstance(frames[0], (tuple, list, dict)):
            return [tuple(frames)]
        if isinstance(frames, (tuple, list)) and all(isinstance(p, (tuple, list, dict)) for p in frames):
            return [pair for item in frames for pair in self._pairs(item)]
        count = len(frames) if isinstance(frames, (tuple, list)) else 1
        raise ValueError(
            f"frames must be a pair (first_frame, second_frame) or a list of pairs, got {type(frames).__name__} "
            f"of {count} item(s); optical flow needs two frames"
        )

    def frame_pair(self, first: Any, second: Any, index: int = 0) -> torch.Tensor:
        """Two frames -> `(2, C, H, W)`, after checking that they are of one size."""
        if first is None or second is None:
            raise ValueError(f"frame pair {index}: got only one frame; optical flow needs two (first, second)")
        a, b = self.to_frame(first, "first frame"), self.to_frame(second, "second frame")
        if a.shape != b.shape:
            raise ValueError(
                f"frame pair {index}: the first frame is {tuple(a.shape[1:])} pixels (height, width), the second "
                f"{tuple(b.shape[1:])}; both frames must be of one size"
            )
        return torch.stack([a, b])

    def __call__(self, frames: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """A frame pair `(first, second)` (or a list of pairs of one size) -> `{"pixel_values": (B, 2, C, H, W)}`."""
        pairs = [self.frame_pair(first, second, i) for i, (first, second) in enumerate(self._pairs(frames))]
        sizes = {tuple(p.shape[-2:]) for p in pairs}
        if len(sizes) > 1:
            raise ValueError(
                f"frame pairs of several sizes {sorted(sizes)} cannot form one batch; process them one at a time "
                "(predict_flow tiles each pair)"
            )
        pixel_values = torch.stack(pairs)
        if return_tensors == "np":
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values})

    # ----------------------------------------------------------------------------------------- tiling

    def tiles(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """One pair `(2, C, H, W)` -> its tiles `(T, 2, C, h, w)` of the tile size (or the whole pair, on an axis
        no longer than a tile) and their top-left corners."""
        height, width = pixel_values.shape[-2:]
        tile_h, tile_w = min(self.tile_size[0], height), min(self.tile_size[1], width)
        corners = tile_positions((height, width), (tile_h, tile_w), self.min_overlap)
        tiles = torch.stack([pixel_values[..., y : y + tile_h, x : x + tile_w] for y, x in corners])
        return tiles, corners

    def combine_tiles(
        self, tile_flows: np.ndarray | torch.Tensor, corners: Sequence[tuple[int, int]], image_size: Sequence[int]
    ) -> np.ndarray:
        """Tile flows `(T, h, w, 2)` at `corners` -> the flow `(H, W, 2)` of the whole image, in pixels (blended with
        `tile_weights`, times `flow_scale_factor`)."""
        tile_flows = tile_flows.detach().float().cpu().numpy() if torch.is_tensor(tile_flows) else tile_flows
        h, w = tile_flows.shape[1:3]
        flow = np.zeros((*image_size, 2), np.float32)
        total = np.zeros((*image_size, 1), np.float32)
        weights = tile_weights((h, w))[..., None]
        for tile_flow, (y, x) in zip(tile_flows, corners, strict=True):
            flow[y : y + h, x : x + w] += tile_flow * weights
            total[y : y + h, x : x + w] += weights
        return flow / total * self.flow_scale_factor

    @torch.no_grad()
    def predict_flow(self, model: torch.nn.Module, first: Any, second: Any, batch_size: int = 8) -> np.ndarray:
        """The flow `(H, W, 2)` in pixels from `first` to `second` (of any size): `model` runs on overlapping tiles
        of the training size, `batch_size` at a time, and the tiles' flows are blended."""
        pair = self.frame_pair(first, second)
        tiles, corners = self.tiles(pair)
        device = next(model.parameters()).device
        flows = [
            model(pixel_values=tiles[i : i + batch_size].to(device)).logits for i in range(0, len(tiles), batch_size)
        ]
        return self.combine_tiles(torch.cat(flows), corners, pair.shape[-2:])

    def flow_to_image(self, flow: np.ndarray | torch.Tensor, max_flow: float | None = None) -> Any:
        """The colour-wheel picture of a flow `(H, W, 2)` as a PIL image (see `flow_to_color`)."""
        try:
            from PIL import Image
        except ImportError as error:  # Pillow is optional: flow_to_color gives the picture as an array without it
            raise ImportError(
                "flow_to_image needs Pillow (pip install 'perceiver-hf[vision]'); flow_to_color returns the picture "
                "as a NumPy array without it"
            ) from error
        return Image.fromarray(flow_to_color(flow, max_flow))
