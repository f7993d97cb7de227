"""Perceiver IO heads for audio and for several modalities at once.

Notation (as in `modeling_perceiver`): B batch, T audio samples, L latents, D latent channels, E decoder query
channels, K classes of a task, S tasks.

- `PerceiverForAudioClassification`: raw waveform `input_values` `(B, T)` -> `(B, num_labels)` logits; registered
  with `AutoModelForAudioClassification`, so `pipeline("audio-classification", model=<saved dir>)` works.
- `PerceiverForMultimodalClassification`: a dict of the modalities declared in `config.modalities` -> logits of one
  or several tasks, with a choice of pooling. transformers has no Auto class for multimodal classification
  (`AutoModelForSequenceClassification` is for text), so this module defines `AutoModelForMultimodalClassification`,
  a regular transformers Auto class that `perceiver_hf` registers the head with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import ModelOutput

from .adapters import OutputAdapter
from .adapters_multimodal import merge_modality_inputs
from .configuration_perceiver import PerceiverConfig
from .modeling_perceiver import (
    PerceiverDecoder,
    PerceiverModel,
    PerceiverPreTrainedModel,
    _classification_loss,
    _PerceiverClassificationModel,
)

__all__ = [
    "PerceiverForAudioClassification",
    "PerceiverForMultimodalClassification",
    "PerceiverMultimodalClassifierOutput",
    "AutoModelForMultimodalClassification",
]


class PerceiverForAudioClassification(_PerceiverClassificationModel):
    """Perceiver IO audio classifier: raw waveform `input_values` `(B, T)` -> `(B, num_labels)` logits.

    The audio input adapter (`config.input_adapter="audio"`) groups `audio_patch_size` samples per input position
    and adds Fourier position features; learned decoder queries cross-attend to the latents and a linear layer gives
    the logits. Loss from `labels` by `config.problem_type`, as the other classification heads.

    Example:

    ```python
    >>> from perceiver_hf import PerceiverConfig, PerceiverFeatureExtractor, PerceiverForAudioClassification
    >>> config = PerceiverConfig(input_adapter="audio", sampling_rate=8000, max_audio_samples=16000,
    ...                          audio_patch_size=32, num_labels=10)
    >>> model = PerceiverForAudioClassification(config)
    >>> feature_extractor = PerceiverFeatureExtractor.from_perceiver_config(config)
    >>> batch = feature_extractor([waveform], sampling_rate=8000, return_tensors="pt")
    >>> model(**batch).logits.shape
    torch.Size([1, 10])
    ```
    """

    main_input_name = "input_values"

    def __init__(self, config: PerceiverConfig) -> None:
        if config.input_adapter != "audio":
            raise ValueError(
                f"PerceiverForAudioClassification needs input_adapter='audio', got {config.input_adapter!r}"
            )
        super().__init__(config)


@dataclass
class PerceiverMultimodalClassifierOutput(ModelOutput):
    """Output of `PerceiverForMultimodalClassification`.

    Args:
        loss: classification loss (mean over the tasks that have labels), when `labels` is given.
        logits: `(B, K)` for one task; for several tasks the tasks' logits concatenated, `(B, K_1 + ... + K_S)`;
            `None` with `pooling="none"`.
        task_logits: the logits of each task, `((B, K_1), ..., (B, K_S))`.
        latents: the encoder's latents `(B, L, D)`.
        pooled: what `pool` returned (the task heads' inputs; the latents with `pooling="none"`).
        hidden_states / attentions: the encoder's, when requested.
        cross_attentions: the encoder's cross-attention weights (then the pooling decoder's), when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    task_logits: tuple[torch.Tensor, ...] | None = None
    latents: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class _QueryOutputAdapter(OutputAdapter):
    """Returns the decoded queries `(B, S, E)` unchanged: the task heads come after pooling."""

    def __init__(self, num_queries: int, num_query_channels: int) -> None:
        super().__init__((num_queries, num_query_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PerceiverForMultimodalClassification(PerceiverPreTrainedModel):
    """Perceiver IO classifier over several modalities in one forward pass.

    The multimodal input adapter (`config.input_adapter="multimodal"`, modalities declared in `config.modalities`)
    turns a dict of modalities into one input array; the encoder maps it to latents `(B, L, D)`; `pool` reduces
    the latents; one task head per task (`config.task_num_labels`, or one task of `num_labels` classes), each a
    LayerNorm and a linear layer, gives the logits. A batch may lack a modality entirely (leave it out) or for
    some examples (a `(B,)` mask of 0s for them).

    Pooling, chosen by `config.pooling`:

    - `"decoder"` (default): S learned queries (one per task) cross-attend to the latents, as Perceiver IO;
    - `"mean"`: the mean over latents, shared by every task head (the original Perceiver);
    - `"latents"`: latent `s` feeds task head `s` (several latents, each for its own task);
    - `"none"`: no pooling and no heads; `latents` (and `pooled`) hold `(B, L, D)` and `logits` is `None`.

    To pool differently, subclass and override `pool`: it gets the latents `(B, L, D)` and returns `(B, D)`
    (shared by every task head) or `(B, S, D)` (one vector per task head), with `D = config.d_latents` for the
    `"mean"` and `"latents"` heads.

    Inputs are given as `inputs={name: tensor}` and `attention_mask={name: mask}`, or as keywords: `image=...`,
    `audio=...`, `audio_mask=...` (what `PerceiverProcessor` returns for a multimodal model).

    Load it with `AutoModelForMultimodalClassification.from_pretrained(dir)` (after `import perceiver_hf`). Where
    the package is not installed, `transformers.dynamic_module_utils.get_class_from_dynamic_module(
    config.auto_map["AutoModelForMultimodalClassification"], dir)` returns the class saved with the model.
    """

    main_input_name = "inputs"
    # `forward` takes modalities as keywords (`**modalities`), which `Trainer` would otherwise read as accepting
    # its loss keywords (`num_items_in_batch`); the loss here is a mean over the batch.
    accepts_loss_kwargs = False

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        if config.input_adapter != "multimodal":
            raise ValueError(
                f"PerceiverForMultimodalClassification needs input_adapter='multimodal', got {config.input_adapter!r}"
            )
        self.perceiver = PerceiverModel(config)
        self.task_num_labels = list(config.task_num_labels or [config.num_labels])
        num_tasks = len(self.task_num_labels)
        width = config.d_latents
        self.pooler = None
        if config.pooling == "decoder":
            width = config.d_output_queries or config.d_latents
            self.pooler = PerceiverDecoder(config, _QueryOutputAdapter(num_tasks, width), use_query_residual=True)
        self.task_heads = nn.ModuleList(
            []
            if config.pooling == "none"
            else [
                nn.Sequential(nn.LayerNorm(width, eps=config.layer_norm_eps), nn.Linear(width, num_labels))
                for num_labels in self.task_num_labels
            ]
        )
        self.post_init()
        if config.freeze_encoder:
            self.freeze_encoder()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then re-applies `config.freeze_encoder` (loading resets
        `requires_grad`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.freeze_encoder:
            model.freeze_encoder()
        return loaded

    @property
    def modality_names(self) -> list[str]:
        return self.perceiver.input_adapter.modality_names

    def pool(self, latents: torch.Tensor) -> torch.Tensor:
        """Reduce the latents `(B, L, D)` to the task heads' inputs; override in a subclass to pool differently.

        Returns `(B, D)` (every task head takes it), `(B, S, D)` (task head `s` takes `[:, s]`), or the latents
        themselves for `pooling="none"`.
        """
        pooling = self.config.pooling
        if pooling == "mean":
            return latents.mean(dim=1)  # (B, D)
        if pooling == "latents":
            return latents[:, : len(self.task_num_labels)]  # (B, S, D): latent s for task s
        if pooling == "decoder":
            return self.pooler(latents).logits  # (B, S, E): one decoded query per task
        return latents  # "none"

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Apply the task heads to `pool`'s output; returns one `(B, K_s)` logits tensor per task."""
        if pooled.ndim == 2:
            return tuple(head(pooled) for head in self.task_heads)
        if pooled.ndim != 3 or pooled.shape[1] != len(self.task_heads):
            raise ValueError(
                f"pool() must return (batch, channels) or (batch, {len(self.task_heads)} tasks, channels), "
                f"got {tuple(pooled.shape)}"
            )
        return tuple(head(pooled[:, s]) for s, head in enumerate(self.task_heads))

    def _gather_inputs(
        self,
        inputs: Mapping[str, torch.Tensor] | None,
        attention_mask: Mapping[str, torch.Tensor] | torch.Tensor | None,
        keyword_inputs: dict[str, torch.Tensor | None],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Merge `inputs` / `attention_mask` dicts and `<name>=` / `<name>_mask=` keywords into two dicts (see
        `merge_modality_inputs`), less the `None` entries; a tensor `attention_mask` is the one given modality's."""
        if isinstance(attention_mask, torch.Tensor):
            given = inputs or {}
            present = [
                name
                for name in self.modality_names
                if given.get(name) is not None or keyword_inputs.get(name) is not None
            ]
            if len(present) != 1:
                raise ValueError(
                    "attention_mask must be a dict {modality name: mask} when several modalities are given "
                    f"(got a tensor for modalities {present})"
                )
            attention_mask = {present[0]: attention_mask}
        data, masks = merge_modality_inputs(self.modality_names, inputs, attention_mask, keyword_inputs)
        data = {name: value for name, value in data.items() if value is not None}
        masks = {name: value for name, value in masks.items() if value is not None}
        return data, masks

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor] | None = None,
        attention_mask: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **modalities: torch.Tensor | None,
    ) -> PerceiverMultimodalClassifierOutput | tuple:
        """
        Args:
            inputs: `{modality name: data}`; see `MultimodalInputAdapter` for the layouts.
            attention_mask: `{modality name: mask}`: `(B,)` per example (0: the example lacks the modality) or
                per position (0: padding). A tensor is accepted when only one modality is given.
            labels: one task: `(B,)` class ids (or as `problem_type` says); several tasks: `(B, S)` class ids,
                -100 where an example has no label for a task.
            **modalities: the same as keywords: `<name>=data`, `<name>_mask=mask`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        data, masks = self._gather_inputs(inputs, attention_mask, modalities)
        if not data:
            raise ValueError(f"no input given: pass at least one of the modalities {self.modality_names}")
        encoded = self.perceiver(
            inputs=data,
            attention_mask=masks or None,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        latents = encoded.last_hidden_state  # (B, L, D)
        pooled = self.pool(latents)
        cross_attentions = encoded.cross_attentions
        if output_attentions and self.pooler is not None:
            # The pooling decoder's weights too, as the other heads return their decoder's (computed again on this
            # request only, so that `pool` stays a plain latents -> features method for subclasses).
            cross_attentions += (self.pooler(latents, output_attentions=True).cross_attentions,)
        task_logits = None if self.config.pooling == "none" else self.classify(pooled)
        logits = None
        if task_logits is not None:
            logits = task_logits[0] if len(task_logits) == 1 else torch.cat(task_logits, dim=-1)
        loss = None
        if labels is not None:
            loss = self._loss(task_logits, labels)
        output = PerceiverMultimodalClassifierOutput(
            loss=loss,
            logits=logits,
            task_logits=task_logits,
            latents=latents,
            pooled=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            cross_attentions=cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _loss(self, task_logits: tuple[torch.Tensor, ...] | None, labels: torch.Tensor) -> torch.Tensor:
        if task_logits is None:
            raise ValueError("labels were given, but pooling='none' has no task heads to compute a loss from")
        if len(task_logits) == 1:
            return _classification_loss(self.config, task_logits[0], labels)
        batch_size, num_tasks = task_logits[0].shape[0], len(task_logits)
        if labels.shape != (batch_size, num_tasks):
            raise ValueError(
                f"labels of {num_tasks} tasks must have shape (batch, tasks) = ({batch_size}, {num_tasks}), "
                f"got {tuple(labels.shape)}"
            )
        losses = [
            F.cross_entropy(logits.float(), labels[:, s].long(), ignore_index=-100, reduction="sum")
            for s, logits in enumerate(task_logits)
        ]
        # Mean over the labelled (example, task) pairs: an example may lack the label of some task.
        num_labelled = (labels != -100).sum().clamp(min=1)
        return torch.stack(losses).sum() / num_labelled


class AutoModelForMultimodalClassification(_BaseAutoModelClass):
    """Auto class for multimodal classification heads (transformers has none): `from_pretrained` / `from_config`
    resolve a config to its registered model class, as every transformers Auto class does."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())
