"""`pipeline("optical-flow")`: two frames in, the flow and its colour-wheel picture out.

`perceiver_hf` registers the task with transformers' pipeline registry, so after `import perceiver_hf`:

```python
>>> from transformers import pipeline
>>> flow = pipeline("optical-flow", model="outputs/optical-flow")  # a saved PerceiverForOpticalFlow
>>> result = flow((first_frame, second_frame))  # PIL images, arrays or tensors of one size, any size
>>> result["flow"].shape, result["image"].size  # (H, W, 2) NumPy array in pixels, PIL colour-wheel picture
```

Frames larger than the model's training size are processed as overlapping tiles of that size, blended
(`PerceiverOpticalFlowProcessor.predict_flow`'s tiling).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

from .processing_optical_flow import PerceiverOpticalFlowProcessor

__all__ = ["OpticalFlowPipeline"]


class OpticalFlowPipeline(Pipeline):
    """Optical flow with any model registered with `AutoModelForOpticalFlow` (`PerceiverForOpticalFlow`).

    Inputs: a pair `(first_frame, second_frame)`, a dict `{"first": ..., "second": ...}`, two positional frames
    (`pipe(first, second)`), or a list of pairs. Returns per pair `{"flow": (H, W, 2) array, "image": PIL image}`.

    Call options: `max_flow` (the flow magnitude shown in full colour; default: the largest in the picture),
    `tile_batch_size` (tiles per forward pass, default 8).
    """

    # The processor is the model's own `PerceiverOpticalFlowProcessor` (loaded below), not an Auto class's.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, image_processor: PerceiverOpticalFlowProcessor | None = None, **kwargs: Any):
        super().__init__(*args, image_processor=image_processor, **kwargs)
        if self.image_processor is None:
            try:
                self.image_processor = PerceiverOpticalFlowProcessor.from_pretrained(self.model.name_or_path)
            except (OSError, ValueError, TypeError):  # no processor saved with the model: the config's defaults
                self.image_processor = PerceiverOpticalFlowProcessor.from_perceiver_config(self.model.config)

    def __call__(self, frames: Any, second_frame: Any = None, **kwargs: Any) -> Any:
        if second_frame is not None:
            frames = (frames, second_frame)
        return super().__call__(frames, **kwargs)

    def _sanitize_parameters(self, max_flow: float | None = None, tile_batch_size: int | None = None, **kwargs):
        forward = {} if tile_batch_size is None else {"tile_batch_size": tile_batch_size}
        postprocess = {} if max_flow is None else {"max_flow": max_flow}
        return {}, forward, postprocess

    def preprocess(self, frames: Any) -> dict[str, Any]:
        ((first, second),) = self.image_processor._pairs(frames)
        pair = self.image_processor.frame_pair(first, second)  # (2, C, H, W), checked
        tiles, corners = self.image_processor.tiles(pair)  # (T, 2, C, h, w)
        return {"pixel_values": tiles.to(self.dtype), "corners": corners, "image_size": tuple(pair.shape[-2:])}

    def _forward(self, model_inputs: dict[str, Any], tile_batch_size: int = 8) -> dict[str, Any]:
        tiles = model_inputs["pixel_values"]
        flows = [
            self.model(pixel_values=tiles[i : i + tile_batch_size]).logits
            for i in range(0, len(tiles), tile_batch_size)
        ]
        return {
            "tile_flows": torch.cat(flows),
            "corners": model_inputs["corners"],
            "image_size": model_inputs["image_size"],
        }

    def postprocess(self, model_outputs: dict[str, Any], max_flow: float | None = None) -> dict[str, Any]:
        flow = self.image_processor.combine_tiles(
            model_outputs["tile_flows"], model_outputs["corners"], model_outputs["image_size"]
        )
        return {"flow": flow, "image": self.image_processor.flow_to_image(flow, max_flow)}
