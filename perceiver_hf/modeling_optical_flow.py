"""Perceiver IO optical flow: DeepMind's flow model (two frames in, per-pixel flow out), trainable.

Notation (as in `modeling_perceiver`): B batch, H x W pixels, N = H * W input positions (one per pixel),
C input channels (patch features + Fourier positions), L latents, D latent channels.

The input adapter (`FlowInputAdapter`, `config.input_adapter="flow"`) turns each pixel's 3 x 3 patches of both
frames, optionally projected, plus Fourier position features into one input position. The encoder's latents
cross-attend to these `N` positions; the decoder is queried by the same features (DeepMind: "we query the decoder
using the first frame features rather than a standard decoder position encoding"; the features hold the patches
of both frames at that pixel), so every pixel decodes its own flow vector. The output is divided by
`config.flow_rescale_factor` (DeepMind's 100).

transformers has no Auto class for optical flow, so this module defines `AutoModelForOpticalFlow`, a regular
transformers Auto class that `perceiver_hf` registers the head with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import ModelOutput

from .adapters import OutputAdapter
from .adapters_flow import FlowInputAdapter
from .configuration_perceiver import PerceiverConfig
from .modeling_perceiver import PerceiverDecoder, PerceiverModel, PerceiverPreTrainedModel, _cross_attentions

__all__ = [
    "FlowOutputAdapter",
    "PerceiverForOpticalFlow",
    "PerceiverOpticalFlowOutput",
    "AutoModelForOpticalFlow",
    "end_point_error",
]


class FlowOutputAdapter(OutputAdapter):
    """Decoded pixels `(B, N, E)` -> flow vectors `(B, N, 2)`: a linear layer, divided by `rescale_factor`.

    Args:
        num_queries: the queries of a training-size input (the decoder owns none: they are the input features).
        num_query_channels: width `E` of the queries (the input adapter's `num_input_channels`).
        rescale_factor: DeepMind's output rescaling (the prediction is divided by it).
    """

    def __init__(self, num_queries: int, num_query_channels: int, rescale_factor: float = 100.0) -> None:
        super().__init__((num_queries, num_query_channels))
        self.rescale_factor = float(rescale_factor)
        self.linear = nn.Linear(num_query_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) / self.rescale_factor  # (B, N, 2)


@dataclass
class PerceiverOpticalFlowOutput(ModelOutput):
    """Output of `PerceiverForOpticalFlow`.

    Args:
        loss: mean end-point error over the valid pixels, when `labels` are given.
        logits: the flow `(B, H, W, 2)`, `(dx, dy)` per pixel of the first frame, in the units of the training labels
            (pixels for models trained here; DeepMind's checkpoint predicts pixels / 20, which its processor undoes).
        hidden_states / attentions / cross_attentions: as in `PerceiverClassifierOutput`, when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def end_point_error(flow: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean end-point error (Euclidean distance of flow vectors) of `flow` `(B, H, W, 2)` against `labels`.

    `labels` is `(B, H, W, 2)`, or `(B, H, W, 3)` whose last channel is a validity mask (1: the pixel has ground
    truth, 0: it has none, as in KITTI or occlusion masks); the mean runs over the valid pixels.
    """
    expected = f"(batch, height, width, 2) or (batch, height, width, 3) = {tuple(flow.shape[:3])} + (2 or 3,)"
    if labels.ndim != 4 or tuple(labels.shape[:3]) != tuple(flow.shape[:3]) or labels.shape[-1] not in (2, 3):
        raise ValueError(f"labels must have shape {expected} (flow, then an optional validity mask), got "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if not labels.is_floating_point():
        raise ValueError(f"labels must be a floating point tensor of flow vectors, got dtype {labels.dtype}")
    target = labels[..., :2].float()
    error = torch.linalg.vector_norm(flow.float() - target, dim=-1)  # (B, H, W)
    if labels.shape[-1] == 2:
        return error.mean()
    valid = labels[..., 2].float()
    return (error * valid).sum() / valid.sum().clamp(min=1.0)


class PerceiverForOpticalFlow(PerceiverPreTrainedModel):
    """Perceiver IO optical flow (DeepMind's architecture): frame pairs -> flow `(B, H, W, 2)`.

    Takes `pixel_values` `(B, 2, C, H, W)` (or channels-last), as `PerceiverOpticalFlowProcessor` returns them for
    frames of the training size (`config.flow_image_size`; the processor tiles larger frames), or `inputs`, the
    already extracted patches `(B, 2, C*k*k, H, W)` that transformers' `PerceiverForOpticalFlow` takes. With
    `labels` `(B, H, W, 2)` (optionally a third channel, the validity mask), `loss` is the mean end-point error.

    Example:

    ```python
    >>> import torch
    >>> from perceiver_hf import PerceiverConfig, PerceiverForOpticalFlow
    >>> config = PerceiverConfig(input_adapter="flow", flow_image_size=[32, 48], num_frequency_bands=16,
    ...                          num_latents=32, d_latents=64, num_self_attention_layers_per_block=2)
    >>> model = PerceiverForOpticalFlow(config)
    >>> frames = torch.randn(1, 2, 3, 32, 48)
    >>> model(pixel_values=frames).logits.shape
    torch.Size([1, 32, 48, 2])
    ```
    """

    main_input_name = "pixel_values"

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        if config.input_adapter != "flow":
            raise ValueError(f"PerceiverForOpticalFlow needs input_adapter='flow', got {config.input_adapter!r}")
        self.perceiver = PerceiverModel(config)
        adapter: FlowInputAdapter = self.perceiver.input_adapter
        height, width = config.flow_image_size
        # No query residual (DeepMind's flow decoder has none): the queries are inputs, not a running state.
        self.flow_decoder = PerceiverDecoder(
            config,
            FlowOutputAdapter(height * width, adapter.num_input_channels, config.flow_rescale_factor),
            use_query_residual=False,
            learned_queries=False,
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> PerceiverOpticalFlowOutput | tuple:
        """
        Args:
            pixel_values: frame pairs `(B, 2, C, H, W)` or `(B, 2, H, W, C)` (the processor's output).
            inputs: patches `(B, 2, C*k*k, H, W)` (transformers' `PerceiverForOpticalFlow` input), instead of
                `pixel_values`.
            labels: flow targets `(B, H, W, 2)`, or `(B, H, W, 3)` with a validity mask last.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if (pixel_values is None) == (inputs is None):
            given = [name for name, value in (("pixel_values", pixel_values), ("inputs", inputs)) if value is not None]
            raise ValueError(
                f"pass exactly one of pixel_values (frame pairs) and inputs (patches), got {given or 'none'}"
            )
        adapter: FlowInputAdapter = self.perceiver.input_adapter
        if pixel_values is not None:
            if pixel_values.is_floating_point() and pixel_values.dtype != self.dtype:
                pixel_values = pixel_values.to(self.dtype)  # float64 from numpy, or a half-precision model
            patches = adapter.extract_patches(pixel_values)  # (B, 2, P, H, W)
        else:
            patches = inputs.to(self.dtype) if torch.is_tensor(inputs) and inputs.is_floating_point() else inputs
        features = adapter.embed_patches(patches)  # (B, N, C), checks the shape
        b, _, _, h, w = patches.shape
        encoded = self.perceiver.encoder(
            features,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            inputs_are_adapted=True,
        )
        decoded = self.flow_decoder(
            encoded.last_hidden_state, output_query=features, output_attentions=bool(output_attentions)
        )
        flow = decoded.logits.reshape(b, h, w, 2)  # (B, H, W, 2)
        loss = None if labels is None else end_point_error(flow, labels)
        output = PerceiverOpticalFlowOutput(
            loss=loss,
            logits=flow,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            cross_attentions=_cross_attentions(encoded, decoded),
        )
        return output if return_dict else output.to_tuple()


class AutoModelForOpticalFlow(_BaseAutoModelClass):
    """Auto class for optical flow heads (transformers has none): `from_pretrained` / `from_config` resolve a
    config to its registered model class, as every transformers Auto class does."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())
