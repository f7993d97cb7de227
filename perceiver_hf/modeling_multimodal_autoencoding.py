"""Perceiver IO multimodal autoencoding: video, audio and a label through one model (DeepMind's Kinetics autoencoder).

Notation (as in `modeling_perceiver`): B batch, L latents, D latent channels, Q_m queries (output points) of modality
m, Q = sum of Q_m, E query channels (the widest modality's query features plus `autoencoding_query_padding`), O the
decoder's shared output channels, P_m values per query of modality m (`prod(patch_size) * channels`, or the classes).

The encoder reads a dict of modalities through the multimodal input adapter (`config.modalities`: video frames as
space-time patches, audio as sample patches, a one-hot label that may be replaced by a learned mask token), each
with its own Fourier features, padded to a common width and tagged per modality. The decoder's queries are, per
output modality (`config.autoencoding_outputs`), Fourier features of the output positions (continuous modalities)
or one learned query (the label), padded to a common width with a learned per-modality vector; all queries attend
to the latents in one cross-attention, then a shared linear layer and one linear layer per modality give the
reconstructions.

Decoding all output points of a video at once is expensive (DeepMind decodes 16 x 224 x 224 pixels in 128 chunks):
`output_points` selects the points (flat indices into each modality's query grid) decoded by one call, and
`reconstruct(..., num_chunks=n)` encodes once, decodes in `n` chunks and reassembles the full reconstruction.

transformers has no Auto class for this task, so this module defines `AutoModelForMultimodalAutoencoding`, a regular
transformers Auto class that `perceiver_hf` registers the head with.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import ModelOutput

from .adapters import OutputAdapter, move_channels_last
from .adapters_multimodal import (
    AutoencodingOutputSpec,
    merge_modality_inputs,
    space_to_depth,
    validate_autoencoding_outputs,
)
from .configuration_perceiver import PerceiverConfig
from .modeling_perceiver import PerceiverDecoder, PerceiverModel, PerceiverPreTrainedModel, _to_dtype

__all__ = [
    "PerceiverForMultimodalAutoencoding",
    "PerceiverMultimodalAutoencodingOutput",
    "AutoModelForMultimodalAutoencoding",
    "depth_to_space",
    "query_positions",
]


def depth_to_space(x: torch.Tensor, grid: tuple[int, ...], patch_sizes: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `space_to_depth`: `(B, prod(grid), prod(patch) * c)` -> `(B, *(grid * patch), c)`."""
    b, k = x.shape[0], len(grid)
    x = x.reshape(b, *grid, *patch_sizes, -1)  # (B, g_1..g_k, p_1..p_k, c)
    order = [0] + [d for i in range(k) for d in (1 + i, 1 + k + i)] + [2 * k + 1]
    return x.permute(order).reshape(b, *(g * p for g, p in zip(grid, patch_sizes, strict=True)), -1)


def query_positions(points: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Flat indices `(Q,)` into `grid` -> positions `(Q, k)` in [-1, 1), `-1 + 2 * index / size` per axis.

    This is DeepMind's mapping of subsampled output points (not `linspace(-1, 1)`, whose last position is 1), used
    for every query so that decoding in chunks gives exactly the full decoding's queries.
    """
    coordinates = torch.stack(torch.unravel_index(points, grid), dim=-1).float()  # (Q, k)
    return -1.0 + 2.0 * coordinates / torch.tensor(grid, dtype=torch.float32, device=points.device)


class _AutoencodingOutputAdapter(OutputAdapter):
    """Decoded queries `(B, Q, E)` -> `(B, Q, O)`: the shared linear layer (DeepMind's `final_layer`)."""

    def __init__(self, num_query_channels: int, num_output_channels: int) -> None:
        super().__init__((1, num_query_channels))
        self.linear = nn.Linear(num_query_channels, num_output_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MultimodalQueries(nn.Module):
    """Decoder queries `(B, Q, E)` of the chosen output points of every output modality.

    Continuous modality: Fourier features of the points' positions on its query grid (`[positions, sin, cos]`, axis
    major, frequencies `linspace(1, max_freq / 2)` per axis); one-hot modality: a learned `(1, query_channels)`
    query. Each is padded to the common width `E` with its own learned vector (`padding.<name>`).
    """

    def __init__(self, outputs: list[AutoencodingOutputSpec], query_padding: int) -> None:
        super().__init__()
        self.outputs = {spec.name: spec for spec in outputs}
        self.num_channels = max(spec.num_query_channels for spec in outputs) + query_padding
        self.learned = nn.ParameterDict(
            {s.name: nn.Parameter(torch.randn(1, s.query_channels) * 0.02) for s in outputs if s.one_hot}
        )
        self.padding = nn.ParameterDict(
            {s.name: nn.Parameter(torch.randn(1, self.num_channels - s.num_query_channels) * 0.02) for s in outputs}
        )

    def fourier(self, spec: AutoencodingOutputSpec, points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        positions = query_positions(points, spec.grid)  # (Q_m, k)
        if spec.num_freq_bands == 0:
            return positions.to(dtype)
        frequencies = torch.stack(
            [torch.linspace(1.0, f / 2.0, spec.num_freq_bands, device=points.device) for f in spec.max_freq]
        )  # (k, F)
        per_position = (positions[:, :, None] * frequencies[None]).flatten(1)  # (Q_m, k*F)
        angles = math.pi * per_position
        return torch.cat([positions, torch.sin(angles), torch.cos(angles)], dim=-1).to(dtype)  # (Q_m, k*(2F+1))

    def forward(self, points: Mapping[str, torch.Tensor], batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        pieces = []
        for name, spec in self.outputs.items():
            # (1, query_channels) learned, or (Q_m, q_m) Fourier features
            query = self.learned[name].to(dtype) if spec.one_hot else self.fourier(spec, points[name], dtype)
            padding = self.padding[name].to(dtype).expand(query.shape[0], -1)
            pieces.append(torch.cat([query, padding], dim=-1))  # (Q_m, E)
        return torch.cat(pieces, dim=0).expand(batch_size, -1, -1)  # (B, Q, E)


@dataclass
class PerceiverMultimodalAutoencodingOutput(ModelOutput):
    """Output of `PerceiverForMultimodalAutoencoding`.

    Args:
        loss: the weighted sum of the modalities' losses (`config.autoencoding_outputs[*].loss_weight`), when
            `labels` are given.
        losses: each modality's loss (mean squared error, or cross-entropy for one-hot modalities).
        decoder_output: the decoder's output `(B, Q, O)` for the decoded points of every output modality in turn
            (the configured order; one-hot modalities: one query), before the per-modality output layers.
        latents: the encoder's latents `(B, L, D)`.
        logits: per output modality, the decoded points `(B, Q_m, P_m)` (values of a point in the order
            (patch axes, channel)); one-hot modalities: class logits `(B, K)`.
        reconstructions: when every point was decoded, each continuous modality in its own shape
            `(B, *shape, channels)` (audio with one channel: `(B, samples)`), one-hot ones as logits `(B, K)`.
        hidden_states / attentions / cross_attentions: the encoder's (then the decoder's cross-attention), when
            requested.
    """

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    # The tensors lead the tuple form (`return_dict=False`), before the per-modality dicts.
    decoder_output: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    reconstructions: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class PerceiverForMultimodalAutoencoding(PerceiverPreTrainedModel):
    """Perceiver IO multimodal autoencoder: a dict of modalities in, a reconstruction of each out.

    Inputs (`inputs={name: tensor}`), as `config.modalities` declares them: e.g. video `(B, T, H, W, C)` (or
    `(B, T, C, H, W)`, transformers' layout) read as space-time patches, audio `(B, samples)` read as sample patches,
    and a label `(B, K)` one-hot (or class ids `(B,)`). A one-hot modality with a mask token may be left out: it is
    then masked (its mask token stands in), which is how the label is predicted ("classification by
    autoencoding"); `masked={name: ...}` masks any modality with a mask token, per example or per position.

    `labels` are the reconstruction targets, a dict like the inputs (the one-hot modality: class ids `(B,)` or class
    scores `(B, K)`); `loss` is the weighted sum of the modalities' mean squared errors (cross-entropy for one-hot
    ones), on the decoded points only.

    Example:

    ```python
    >>> import torch
    >>> from perceiver_hf import PerceiverConfig, PerceiverForMultimodalAutoencoding
    >>> config = PerceiverConfig(
    ...     input_adapter="multimodal",
    ...     modalities=[
    ...         {"name": "image", "channels": 1, "num_axes": 3, "num_freq_bands": 4, "max_freq": [1, 28, 28],
    ...          "patch_size": [1, 4, 4]},
    ...         {"name": "label", "channels": 10, "num_axes": 1, "num_freq_bands": 0, "max_freq": 1,
    ...          "one_hot": True, "mask_token": True},
    ...     ],
    ...     modality_encoding="concat", modality_padding=4,
    ...     autoencoding_outputs=[{"name": "image", "shape": [1, 28, 28]}, {"name": "label", "query_channels": 16}],
    ...     num_latents=16, d_latents=32, num_self_attention_layers_per_block=2, num_self_attention_heads=4,
    ... )
    >>> model = PerceiverForMultimodalAutoencoding(config)
    >>> out = model(inputs={"image": torch.rand(2, 1, 28, 28, 1)})  # label left out: masked, predicted
    >>> out.reconstructions["image"].shape, out.reconstructions["label"].shape
    (torch.Size([2, 1, 28, 28, 1]), torch.Size([2, 10]))
    ```
    """

    main_input_name = "inputs"
    # `forward` takes modalities as keywords (`**modalities`), which `Trainer` would otherwise read as accepting its
    # loss keywords (`num_items_in_batch`); the loss here is a mean over the batch.
    accepts_loss_kwargs = False

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        if config.input_adapter != "multimodal" or not config.autoencoding_outputs:
            raise ValueError(
                "PerceiverForMultimodalAutoencoding needs input_adapter='multimodal' and autoencoding_outputs, got "
                f"input_adapter={config.input_adapter!r}, autoencoding_outputs={config.autoencoding_outputs!r}"
            )
        self.perceiver = PerceiverModel(config)
        outputs = validate_autoencoding_outputs(config.autoencoding_outputs, config.modalities)
        self.output_specs = {spec.name: spec for spec in outputs}
        self.queries = MultimodalQueries(outputs, config.autoencoding_query_padding)
        num_output_channels = config.autoencoding_output_channels or self.queries.num_channels
        # DeepMind's multimodal decoder: one cross-attention for all modalities' queries, no query residual.
        self.decoder = PerceiverDecoder(
            config,
            _AutoencodingOutputAdapter(self.queries.num_channels, num_output_channels),
            use_query_residual=False,
            learned_queries=False,
        )
        self.output_heads = nn.ModuleDict(
            {spec.name: nn.Linear(num_output_channels, spec.values_per_point) for spec in outputs}
        )
        self.post_init()

    @property
    def modality_names(self) -> list[str]:
        return self.perceiver.input_adapter.modality_names

    # ------------------------------------------------------------------------------------------ encoding

    def encode(
        self,
        inputs: Mapping[str, torch.Tensor],
        attention_mask: Mapping[str, torch.Tensor] | None = None,
        masked: Mapping[str, torch.Tensor | bool] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ):
        """The encoder's output for `inputs`; a left-out one-hot modality with a mask token is masked."""
        if not isinstance(inputs, Mapping):
            raise ValueError(f"inputs must be a dict {{modality name: tensor}}, got {type(inputs).__name__}")
        adapter = self.perceiver.input_adapter
        data = {name: value for name, value in inputs.items() if value is not None}
        unknown = sorted(set(data) - set(adapter.specs))
        if unknown:
            raise ValueError(f"inputs has unknown modalities {unknown}; this model takes {self.modality_names}")
        masked = dict(masked or {})
        present = [name for name in self.modality_names if name in data]
        if not present:
            raise ValueError(f"inputs hold none of the modalities {self.modality_names}")
        batch_size = data[present[0]].shape[0]
        for name, spec in adapter.specs.items():
            if name in data:
                continue
            if spec.one_hot and spec.mask_token:
                data[name] = torch.zeros(batch_size, spec.channels, device=data[present[0]].device)
                masked[name] = True  # left out: its mask token stands in (what DeepMind's model always does)
            else:
                raise ValueError(
                    f"inputs lacks modality {name!r}: got {sorted(data)}, expected every modality of "
                    f"{self.modality_names} (only one-hot modalities with a mask token may be left out)"
                )
        data = {name: data[name] for name in self.modality_names}  # the configured order
        return self.perceiver.encoder(
            _to_dtype(data, self.dtype),
            attention_mask=attention_mask or None,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            masked=masked,
        )

    # ------------------------------------------------------------------------------------------ decoding

    def output_points(
        self, output_points: Mapping[str, torch.Tensor | None] | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Every continuous output modality's points `(Q_m,)` (all of its grid where not given), checked."""
        given = dict(output_points or {})
        unknown = sorted(set(given) - set(self.output_specs))
        if unknown:
            raise ValueError(f"output_points has unknown modalities {unknown}; outputs: {list(self.output_specs)}")
        points = {}
        for name, spec in self.output_specs.items():
            if spec.one_hot:
                continue  # one learned query, always decoded
            value = given.get(name)
            if value is None:
                points[name] = torch.arange(spec.num_points, device=device)
                continue
            value = torch.as_tensor(value, device=device)
            if value.ndim != 1 or value.dtype in (torch.bool,) or value.is_floating_point():
                raise ValueError(
                    f"output_points[{name!r}] must be a 1-d tensor of integer indices into the {spec.grid} query "
                    f"grid, got shape {tuple(value.shape)} {value.dtype}"
                )
            if value.numel() and (value.min() < 0 or value.max() >= spec.num_points):
                raise ValueError(
                    f"output_points[{name!r}] must index the {spec.num_points} points of the {spec.grid} query grid, "
                    f"got indices from {int(value.min())} to {int(value.max())}"
                )
            points[name] = value.long()
        return points

    def decode(
        self, latents: torch.Tensor, points: Mapping[str, torch.Tensor], output_attentions: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Latents `(B, L, D)` and the points of each continuous modality -> per-modality logits `(B, Q_m, P_m)`
        (one-hot modalities: `(B, K)`), the decoder's output `(B, Q, O)` (after the shared projection, before the
        per-modality layers), and the decoder's cross-attention weights when requested."""
        b = latents.shape[0]
        queries = self.queries(points, b, latents.dtype)  # (B, Q, E)
        decoded = self.decoder(latents, output_query=queries, output_attentions=output_attentions)
        features = decoded.logits  # (B, Q, O)
        logits, start = {}, 0
        for name, spec in self.output_specs.items():
            n = 1 if spec.one_hot else points[name].shape[0]
            values = self.output_heads[name](features[:, start : start + n])  # (B, Q_m, P_m)
            logits[name] = values[:, 0] if spec.one_hot else values
            start += n
        return logits, features, decoded.cross_attentions

    def assemble(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of every point (in grid order) -> reconstructions in each modality's shape `(B, *shape, c)`
        (1-axis, 1-channel modalities such as audio: `(B, samples)`); one-hot logits pass through."""
        out = {}
        for name, spec in self.output_specs.items():
            value = logits[name]
            if spec.one_hot:
                out[name] = value
                continue
            if value.shape[1] != spec.num_points:
                raise ValueError(
                    f"logits[{name!r}] hold {value.shape[1]} points; assembling needs all {spec.num_points}"
                )
            full = depth_to_space(value, spec.grid, spec.patch_size)  # (B, *shape, c)
            out[name] = full[..., 0] if len(spec.shape) == 1 and spec.channels == 1 else full
        return out

    @torch.no_grad()
    def reconstruct(
        self,
        inputs: Mapping[str, torch.Tensor],
        attention_mask: Mapping[str, torch.Tensor] | None = None,
        masked: Mapping[str, torch.Tensor | bool] | None = None,
        num_chunks: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Full reconstructions of `inputs`, decoded in `num_chunks` chunks of each modality's points (as DeepMind
        decodes video: chunk `i` holds the `i`-th slice of every modality's grid); the latents are computed once.
        """
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks ({num_chunks!r}) must be a positive integer")
        latents = self.encode(inputs, attention_mask, masked).last_hidden_state
        all_points = self.output_points(None, latents.device)
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.output_specs}
        for i in range(num_chunks):
            chunk = {name: p.tensor_split(num_chunks)[i] for name, p in all_points.items()}
            logits, _, _ = self.decode(latents, chunk)
            for name, value in logits.items():
                if self.output_specs[name].one_hot:
                    pieces[name] = [value]  # the same query in every chunk
                else:
                    pieces[name].append(value)
        return self.assemble({name: torch.cat(values, dim=1) for name, values in pieces.items()})

    # ------------------------------------------------------------------------------------------ loss

    def target_points(self, name: str, target: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """A continuous modality's target in its own shape -> the values of `points`, `(B, Q_m, P_m)`."""
        spec = self.output_specs[name]
        k, c = len(spec.shape), spec.channels
        expected = f"(batch, {', '.join(map(str, spec.shape))}, {c})" + (
            f" or (batch, {', '.join(map(str, spec.shape))})" if c == 1 else ""
        )
        x = target
        if torch.is_tensor(x) and x.ndim == k + 1 and c == 1:
            x = x.unsqueeze(-1)
        if torch.is_tensor(x) and k == 3 and x.ndim == 5 and x.shape[2] == c and x.shape[-1] != c and x.shape[1] != c:
            x = x.permute(0, 1, 3, 4, 2)  # (B, T, c, H, W) frames
        x = move_channels_last(x, c) if torch.is_tensor(x) and x.ndim == k + 2 else None
        if x is None or tuple(x.shape[1:-1]) != spec.shape or not x.is_floating_point():
            got = f"{tuple(target.shape)} {target.dtype}" if torch.is_tensor(target) else type(target).__name__
            raise ValueError(f"labels[{name!r}] must be floats of shape {expected}, got {got}")
        patches = space_to_depth(x, spec.patch_size, name).reshape(x.shape[0], spec.num_points, -1)  # (B, N, P_m)
        return patches[:, points]

    def compute_losses(
        self, logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], points: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(labels, Mapping):
            raise ValueError(f"labels must be a dict {{modality name: target}}, got {type(labels).__name__}")
        unknown = sorted(set(labels) - set(self.output_specs))
        if unknown:
            raise ValueError(
                f"labels has modalities {unknown} that are not outputs; outputs: {list(self.output_specs)}"
            )
        losses = {}
        for name, target in labels.items():
            if target is None:
                continue
            spec, prediction = self.output_specs[name], logits[name].float()
            if spec.one_hot:
                b, k = prediction.shape
                if torch.is_tensor(target) and target.shape == (b,) and not target.is_floating_point():
                    losses[name] = F.cross_entropy(prediction, target.long(), ignore_index=-100)
                elif torch.is_tensor(target) and target.shape == (b, k) and target.is_floating_point():
                    losses[name] = F.cross_entropy(prediction, target.float())  # class probabilities
                else:
                    got = f"{tuple(target.shape)} {target.dtype}" if torch.is_tensor(target) else type(target).__name__
                    raise ValueError(
                        f"labels[{name!r}] must be class ids of shape ({b},) or class scores of shape ({b}, {k}), "
                        f"got {got}"
                    )
            else:
                losses[name] = F.mse_loss(prediction, self.target_points(name, target, points[name]).float())
        if not losses:
            raise ValueError(f"labels hold none of the output modalities {list(self.output_specs)}")
        total = sum(self.output_specs[name].loss_weight * loss for name, loss in losses.items())
        return total, losses

    # ------------------------------------------------------------------------------------------ forward

    def _gather_inputs(self, inputs, attention_mask, keywords) -> tuple[dict, dict]:
        """Merge `inputs` / `attention_mask` dicts and `<name>=` / `<name>_mask=` keywords into two dicts."""
        data, masks = merge_modality_inputs(self.modality_names, inputs, attention_mask, keywords)
        if not data:
            raise ValueError(
                f"no input given: pass inputs={{name: tensor}} or keywords for the modalities {self.modality_names}"
            )
        return data, masks

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor] | None = None,
        attention_mask: Mapping[str, torch.Tensor] | None = None,
        masked: Mapping[str, torch.Tensor | bool] | None = None,
        labels: Mapping[str, torch.Tensor] | None = None,
        output_points: Mapping[str, torch.Tensor | None] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **modalities: torch.Tensor | None,
    ) -> PerceiverMultimodalAutoencodingOutput | tuple:
        """
        Args:
            inputs: `{modality name: data}`: every modality (a one-hot modality with a mask token may be left out,
                and is then masked).
            attention_mask: `{modality name: mask}` (see `MultimodalInputAdapter`).
            masked: `{modality name: True, (B,) or (B, N_m) booleans}`: replaced by the modality's mask token.
            labels: `{modality name: target}`: reconstruction targets in each modality's shape (one-hot modality:
                class ids `(B,)` or scores `(B, K)`); any subset of the outputs.
            output_points: `{modality name: (Q_m,) flat indices into its query grid}`: the points decoded by this
                call (all of a modality's points where not given).
            **modalities: the inputs as keywords instead (`image=...`, `audio=...`, `audio_mask=...`), as the
                processor returns them; `Trainer` batches should use them (it reads a batch's `inputs` as one tensor).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        inputs, attention_mask = self._gather_inputs(inputs, attention_mask, modalities)
        encoded = self.encode(inputs, attention_mask, masked, output_attentions, output_hidden_states)
        latents = encoded.last_hidden_state  # (B, L, D)
        points = self.output_points(output_points, latents.device)
        logits, decoder_output, decoder_attentions = self.decode(latents, points, output_attentions)
        complete = all(points[name].shape[0] == spec.num_points for name, spec in self.output_specs.items()
                       if not spec.one_hot) and output_points is None  # fmt: skip
        loss = losses = None
        if labels is not None:
            loss, losses = self.compute_losses(logits, labels, points)
        cross_attentions = encoded.cross_attentions
        if cross_attentions is not None and decoder_attentions is not None:
            cross_attentions = cross_attentions + (decoder_attentions,)
        output = PerceiverMultimodalAutoencodingOutput(
            loss=loss,
            losses=losses,
            logits=logits,
            reconstructions=self.assemble(logits) if complete else None,
            decoder_output=decoder_output,
            latents=latents,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            cross_attentions=cross_attentions,
        )
        return output if return_dict else output.to_tuple()


class AutoModelForMultimodalAutoencoding(_BaseAutoModelClass):
    """Auto class for multimodal autoencoding heads (transformers has none): `from_pretrained` / `from_config`
    resolve a config to its registered model class, as every transformers Auto class does."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())
