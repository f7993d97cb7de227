"""The model API of lucidrains' perceiver-pytorch and of the multi-modality fork, built from this package's blocks.

Users of `perceiver_pytorch` (lucidrains) and of `perceiver-multi-modality-pytorch` (Fabien Campagne's fork) can
keep their code and change only the import:

```python
>>> from perceiver_hf import Perceiver, InputModality, MultiModalityPerceiver
>>> model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=6, num_latents=256,
...                   latent_dim=512, cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=64,
...                   num_classes=1000, attn_dropout=0.0, ff_dropout=0.0, weight_tie_layers=False)
>>> model(torch.randn(1, 224, 224, 3)).shape
torch.Size([1, 1000])
```

The classes take the same constructor arguments and inputs as there: channels-last data `(B, *axes, C)`, a dict
`{name: data}` for the multimodal classes, an optional boolean `mask`. Inside, they are this package's parts:
`MultimodalInputAdapter` (Fourier features per modality, channels padded to a common width, a learned modality
embedding keyed by name), `PerceiverCrossAttentionLayer` and `PerceiverSelfAttentionBlock` (SDPA attention,
GEGLU or GELU feed-forward with widening factor 4, as lucidrains'). Differences from the originals, all
deliberate:

- the modality encoding is a learned embedding keyed by the modality's name, not a one-hot vector by its index
  among the modalities present, so a modality's encoding does not change when another one is missing;
- with `weight_tie_layers=True`, the keys and values of the inputs are computed once for all the layers that
  share weights (layers 2..), not once per layer, and they are not stored per layer for the backward pass;
- Fourier frequencies are linearly spaced from 1 to `max_freq / 2` (current lucidrains); `freq_base` is accepted
  and ignored. The multi-modality fork's extra residual around each latent block is not reproduced.

Shapes: B batch, N input positions, C input channels, L latents (`num_latents`), D `latent_dim`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .adapters_multimodal import ModalitySpec, MultimodalInputAdapter
from .modeling_perceiver import PerceiverCrossAttentionLayer, PerceiverSelfAttentionBlock

__all__ = [
    "Perceiver",
    "InputModality",
    "InputModalityWithEmbedding",
    "MultiModalityPerceiver",
    "MultiModalityPerceiverNoPooling",
    "MultiModalityWithTextPerceiver",
]

# lucidrains' feed-forward widens the latent width 4x.
_FF_MULT = 4


@dataclass
class InputModality:
    """A modality of `MultiModalityPerceiver`, as in the multi-modality fork.

    Args:
        name: the modality's key in the input dict.
        input_channels: channels of each position (3 for RGB, 1 for mono audio).
        input_axis: number of axes (1 audio, 2 images, 3 video).
        num_freq_bands: Fourier frequency bands per axis.
        max_freq: highest Fourier frequency (the top band is `max_freq / 2`).
        freq_base: accepted for compatibility; the frequencies are linearly spaced.
    """

    name: str
    input_channels: int
    input_axis: int
    num_freq_bands: int
    max_freq: float
    freq_base: int = 2

    @property
    def input_dim(self) -> int:
        """Channels of this modality's data plus its Fourier features."""
        return self.input_axis * (2 * self.num_freq_bands + 1) + self.input_channels

    def spec(self, split_across_layers: bool = False) -> ModalitySpec:
        return ModalitySpec(
            name=self.name,
            channels=self.input_channels,
            num_axes=self.input_axis,
            num_freq_bands=self.num_freq_bands,
            max_freq=float(self.max_freq),
        )


@dataclass
class InputModalityWithEmbedding(InputModality):
    """A modality of `MultiModalityWithTextPerceiver`: with an `embedding` (e.g. `nn.Embedding(32000, 256)`), the
    inputs are token ids `(B, L, 1)` or `(B, L)`, embedded and split across the layers (layer `i` of `depth` sees
    embedding channels `[i * E / depth, (i + 1) * E / depth)`); without one, a plain `InputModality`."""

    embedding: nn.Module | None = None

    def embedding_dim(self, depth: int) -> int:
        """Channels that each layer sees from this modality (data plus Fourier features), as in the fork."""
        if self.embedding is None:
            return self.input_dim
        return self.embedding.embedding_dim // depth + self.input_axis * (2 * self.num_freq_bands + 1)

    def spec(self, split_across_layers: bool = False) -> ModalitySpec:
        if self.embedding is None:
            return super().spec()
        return ModalitySpec(
            name=self.name,
            channels=self.embedding.embedding_dim,
            num_axes=self.input_axis,
            num_freq_bands=self.num_freq_bands,
            max_freq=float(self.max_freq),
            vocab_size=self.embedding.num_embeddings,
            split_across_layers=split_across_layers,
        )


class _PerceiverLayers(nn.Module):
    """`depth` x (cross-attention from the latents to the inputs, then `self_per_cross_attn` self-attention layers).

    Weight tying as lucidrains': without it every layer has its own weights; with it layer 1 has its own and
    layers 2.. share one set. Shared layers are stored once (the module lists hold at most two entries then).
    """

    def __init__(
        self,
        *,
        num_input_channels: int,
        depth: int,
        num_latents: int,
        latent_dim: int,
        cross_heads: int,
        latent_heads: int,
        cross_dim_head: int,
        latent_dim_head: int,
        attn_dropout: float,
        ff_dropout: float,
        weight_tie_layers: bool,
        self_per_cross_attn: int,
        hidden_act: str,
    ) -> None:
        super().__init__()
        for name, value in (("depth", depth), ("num_latents", num_latents), ("latent_dim", latent_dim),
                            ("self_per_cross_attn", self_per_cross_attn)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        self.depth = depth
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))  # (L, D), lucidrains' N(0, 1) init

        def cross_attention() -> PerceiverCrossAttentionLayer:
            return PerceiverCrossAttentionLayer(
                cross_heads,
                latent_dim,
                num_input_channels,
                num_qk_channels=cross_heads * cross_dim_head,
                num_v_channels=cross_heads * cross_dim_head,
                widening_factor=_FF_MULT,
                use_query_residual=True,
                dropout=ff_dropout,
                attention_dropout=attn_dropout,
                hidden_act=hidden_act,
            )

        def self_attention() -> PerceiverSelfAttentionBlock:
            return PerceiverSelfAttentionBlock(
                self_per_cross_attn,
                num_heads=latent_heads,
                num_channels=latent_dim,
                num_qk_channels=latent_heads * latent_dim_head,
                num_v_channels=latent_heads * latent_dim_head,
                widening_factor=_FF_MULT,
                dropout=ff_dropout,
                attention_dropout=attn_dropout,
                hidden_act=hidden_act,
            )

        num_distinct = min(depth, 2) if weight_tie_layers else depth
        self.cross_attention_layers = nn.ModuleList(cross_attention() for _ in range(num_distinct))
        self.self_attention_blocks = nn.ModuleList(self_attention() for _ in range(num_distinct))

    def forward(self, x: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs `(B, N, C)` (or one such array per layer) and an optional `(B, N)` mask -> latents `(B, L, D)`."""
        layer_inputs = list(x) if isinstance(x, (list, tuple)) else [x] * self.depth
        b, n, _ = layer_inputs[0].shape
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must have shape (batch, positions) = ({b}, {n}), got {tuple(mask.shape)}")
        last = len(self.cross_attention_layers) - 1
        # Keys and values depend only on a layer's weights and its inputs: tied layers reuse them. Each pair is
        # dropped after its last use, so no layer's keys and values outlive it needlessly.
        keys = [(min(i, last), id(layer_inputs[i])) for i in range(self.depth)]
        uses_left = Counter(keys)
        cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        latents = self.latents.expand(b, -1, -1)  # (B, L, D)
        for i in range(self.depth):
            cross_attention = self.cross_attention_layers[min(i, last)]
            kv = cache.pop(keys[i], None)
            if kv is None:
                kv = cross_attention.project_kv(layer_inputs[i])  # (B, H, N, Dk), (B, H, N, Dv)
            uses_left[keys[i]] -= 1
            if uses_left[keys[i]]:
                cache[keys[i]] = kv
            latents, _ = cross_attention(latents, None, mask, False, kv)
            del kv
            for layer in self.self_attention_blocks[min(i, last)]:
                latents, _ = layer(latents)
        return latents


def _joint_mask(
    adapter_mask: torch.Tensor | None, mask: torch.Tensor | Mapping[str, torch.Tensor] | None
) -> torch.Tensor | None:
    """The mask for the layers: the adapter's (built from per-modality masks), or a joint one given as a tensor."""
    if isinstance(mask, torch.Tensor):
        return mask.reshape(mask.shape[0], -1).bool()  # (B, *axes) or (B, N) -> (B, N)
    return adapter_mask


class Perceiver(nn.Module):
    """lucidrains' `Perceiver`: channels-last data `(B, *axes, input_channels)` -> `(B, num_classes)` logits.

    `depth` x (cross-attention -> `self_per_cross_attn` self-attention layers), then the mean over latents, a
    LayerNorm and a linear layer (`final_classifier_head=False`: the latents `(B, L, D)` are returned instead).
    Arguments as in lucidrains' `Perceiver`; `fourier_encode_data=False` leaves out the Fourier features.
    """

    def __init__(
        self,
        *,
        num_freq_bands: int,
        depth: int,
        max_freq: float,
        input_channels: int = 3,
        input_axis: int = 2,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        fourier_encode_data: bool = True,
        self_per_cross_attn: int = 1,
        final_classifier_head: bool = True,
        freq_base: int = 2,
    ) -> None:
        super().__init__()
        spec = ModalitySpec(
            name="data",
            channels=input_channels,
            num_axes=input_axis,
            num_freq_bands=num_freq_bands if fourier_encode_data else 0,
            max_freq=float(max_freq),
        )
        # One modality: no modality embedding, exactly the original's data + Fourier features.
        self.input_adapter = MultimodalInputAdapter([spec], use_modality_embedding=False)
        self.layers = _PerceiverLayers(
            num_input_channels=self.input_adapter.num_input_channels,
            depth=depth,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers,
            self_per_cross_attn=self_per_cross_attn,
            hidden_act="geglu",
        )
        self.to_logits = (
            nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))
            if final_classifier_head
            else None
        )

    def forward(self, data: torch.Tensor, mask: torch.Tensor | None = None, return_embeddings: bool = False):
        """
        Args:
            data: `(B, *axes, input_channels)`.
            mask: `(B, *axes)` or `(B, N)` booleans, True for positions to attend to.
            return_embeddings: return the latents `(B, L, D)` instead of the logits.
        """
        x, _ = self.input_adapter({"data": data})
        latents = self.layers(x, _joint_mask(None, mask))
        if return_embeddings or self.to_logits is None:
            return latents
        return self.to_logits(latents.mean(dim=1))


class MultiModalityPerceiver(nn.Module):
    """The multi-modality fork's `MultiModalityPerceiver`: a dict `{name: (B, *axes, C)}` -> `(B, num_classes)`.

    Each modality gets its own Fourier features, is padded to the common width and gets its modality embedding;
    the modalities are concatenated and attended to by `depth` x (cross-attention, `num_latent_blocks_per_layer`
    self-attention layers). A batch may leave out some modalities. Override `pool` to change how the latents are
    reduced before `to_logits` (default: the mean over latents).

    Args:
        modalities: the `InputModality`s.
        depth: number of cross-attention layers.
        num_classes: classes of the output; `None` returns the pooled latents `(B, D)`.
        num_latent_blocks_per_layer: self-attention layers after each cross-attention.
        use_gelu: GELU feed-forward (as the Perceiver paper); `False`: GEGLU (lucidrains).
        cross_dim: accepted for compatibility with an older README; the cross-attention width is
            `cross_heads * cross_dim_head`.
        other arguments: as lucidrains' `Perceiver`.
    """

    _split_text_across_layers = False

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = False,
        cross_dim: int | None = None,
    ) -> None:
        super().__init__()
        modalities = list(modalities)
        if not modalities or not all(isinstance(m, InputModality) for m in modalities):
            raise ValueError(f"modalities must be a non-empty sequence of InputModality, got {modalities!r}")
        # Sorted by name, as the fork concatenates them, so a joint `mask` tensor lines up with the inputs.
        modalities = sorted(modalities, key=lambda m: m.name)
        self.modalities = {m.name: m for m in modalities}
        embeddings = {
            m.name: m.embedding
            for m in modalities
            if isinstance(m, InputModalityWithEmbedding) and m.embedding is not None
        }
        self.input_adapter = MultimodalInputAdapter(
            [m.spec(split_across_layers=self._split_text_across_layers) for m in modalities],
            num_layers=depth if self._split_text_across_layers else 1,
            token_embeddings=embeddings,
        )
        self.layers = _PerceiverLayers(
            num_input_channels=self.input_adapter.num_input_channels,
            depth=depth,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers,
            self_per_cross_attn=num_latent_blocks_per_layer,
            hidden_act="gelu" if use_gelu else "geglu",
        )
        self.to_logits: nn.Module = (
            nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))
            if num_classes is not None
            else nn.Identity()
        )

    def forward(
        self,
        multi_modality_data: Mapping[str, torch.Tensor],
        mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            multi_modality_data: `{name: (B, *axes, C)}` (token ids `(B, L, 1)` for embedded modalities).
            mask: a joint `(B, N)` boolean mask over the concatenated modalities (sorted by name), or a dict
                `{name: mask}` with `(B,)` or `(B, *axes)` masks.
        """
        per_modality = mask if isinstance(mask, Mapping) else None
        x, adapter_mask = self.input_adapter(multi_modality_data, per_modality)
        latents = self.layers(x, _joint_mask(adapter_mask, mask))  # (B, L, D)
        return self.to_logits(self.pool(latents))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce the latents `(B, L, D)` before `to_logits`; override to pool differently. Default: mean."""
        return x.mean(dim=-2)


class MultiModalityPerceiverNoPooling(MultiModalityPerceiver):
    """`MultiModalityPerceiver` that returns the latents `(B, L, D)`: no pooling and no classifier, e.g. to feed
    several latents to several task heads. GELU feed-forward by default, as in the fork."""

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = True,
    ) -> None:
        super().__init__(
            modalities=modalities,
            depth=depth,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            num_classes=None,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers,
            num_latent_blocks_per_layer=num_latent_blocks_per_layer,
            use_gelu=use_gelu,
        )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MultiModalityWithTextPerceiver(MultiModalityPerceiver):
    """The fork's `MultiModalityWithTextPerceiver`: modalities with an embedding (text) are split across the
    layers, each cross-attention layer seeing its own slice of the embedding channels (`embedding_dim` must be
    divisible by `depth`); the others are as in `MultiModalityPerceiver`. GEGLU feed-forward, as in the fork."""

    _split_text_across_layers = True

    def __init__(
        self,
        *,
        modalities: Iterable[InputModalityWithEmbedding],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 6,
    ) -> None:
        super().__init__(
            modalities=modalities,
            depth=depth,
            num_latents=num_latents,
            latent_dim=latent_dim,
            cross_heads=cross_heads,
            latent_heads=latent_heads,
            cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head,
            num_classes=num_classes,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers,
            num_latent_blocks_per_layer=num_latent_blocks_per_layer,
            use_gelu=False,
        )
