"""Multimodal input adapter: several modalities, each with its own Fourier features, in one input array.

Shapes: B batch, N_m positions of modality m, N = sum of N_m, c_m features of modality m (its data
channels plus its Fourier position channels), C = max over m of c_m, L cross-attention layers.

Each modality is declared by a `ModalitySpec` (a plain dict in `PerceiverConfig.modalities`): name,
channels, number of axes, Fourier `num_freq_bands` and `max_freq`, and for token inputs (text) a vocabulary.
`MultimodalInputAdapter` maps a dict `{name: tensor}` to one `(B, N, C)` array:

1. each modality's data, laid out channels-last and flattened to `(B, N_m, channels)` (text: token ids embedded;
   1-axis data optionally grouped into patches), gets its own Fourier position features;
2. the result is zero-padded to the common width `C`, and a learned embedding of the modality, keyed by its
   name, is added (so the embedding of "audio" is the same whether or not "image" is in the batch);
3. the modalities present are concatenated along the positions, with a joint `(B, N)` attention mask built
   from the per-modality masks. A modality may be left out of the dict (the whole batch lacks it), or masked
   out per example with a `(B,)` mask (some examples lack it).

Text can be split across the cross-attention layers, as in the multi-modality Perceiver fork: with
`split_across_layers`, layer `l` sees embedding channels `[l * channels / L, (l + 1) * channels / L)`, and the
adapter returns one input array per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import InputAdapter, move_channels_last
from .adapters_audio import patch_features
from .position_encoding import FourierPositionEncoding

if TYPE_CHECKING:
    from .configuration_perceiver import PerceiverConfig

__all__ = [
    "ModalitySpec",
    "ModalityFeatures",
    "TokenModalityFeatures",
    "MODALITY_FEATURES",
    "MultimodalInputAdapter",
    "validate_modalities",
    "RESERVED_MODALITY_NAMES",
]

# Model keyword arguments that a modality name would shadow (modalities are also passed as keywords).
RESERVED_MODALITY_NAMES = frozenset(
    {"inputs", "attention_mask", "labels", "output_attentions", "output_hidden_states", "return_dict", "kwargs"}
)
MASK_SUFFIX = "_mask"


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality of a multimodal Perceiver.

    Args:
        name: the modality's key in the input dict (a Python identifier, not ending in `_mask`).
        channels: channels per position (for token modalities: the embedding width).
        num_axes: number of position axes (1 for audio and text, 2 for images, 3 for video).
        num_freq_bands: Fourier frequency bands per axis (0: no position features).
        max_freq: highest Fourier frequency; the top band is `max_freq / 2` (the Nyquist frequency of a grid of
            `max_freq` positions).
        vocab_size: for token inputs (text): the number of token ids; ids are embedded to `channels`.
        split_across_layers: token inputs: cross-attention layer `l` of `L` sees only embedding channels
            `[l * channels / L, (l + 1) * channels / L)` (the multi-modality Perceiver fork's text option).
        max_length: 1-axis inputs: the longest input accepted. Positions are encoded on a fixed grid of this
            length (in patches), so features do not depend on how much padding the batch has. `None`: the
            grid spans the input's own length, as in the original Perceiver.
        patch_size: 1-axis inputs: consecutive positions grouped into one (e.g. audio samples).
        spectrogram: 1-axis inputs with `patch_size > 1`: each patch as its log power spectrum
            (`patch_size // 2 + 1` bins per channel, see `AudioInputAdapter`) instead of its raw values.
    """

    name: str
    channels: int
    num_axes: int
    num_freq_bands: int
    max_freq: float
    vocab_size: int | None = None
    split_across_layers: bool = False
    max_length: int | None = None
    patch_size: int = 1
    spectrogram: bool = False

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], num_cross_attention_layers: int = 1) -> ModalitySpec:
        """A validated spec from a config dict; errors name the modality, the key, the value and what was expected."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"each modality must be a dict, got {spec!r}")
        name = spec.get("name")
        where = f"modality {name!r}"
        known = {f.name for f in fields(cls)}
        required = ("name", "channels", "num_axes", "num_freq_bands", "max_freq")
        missing = [key for key in required if key not in spec]
        if missing:
            raise ValueError(f"{where} lacks {missing}; each modality needs {list(required)}")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(known)}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"modality name ({name!r}) must be a Python identifier such as 'image' or 'audio'")
        if name in RESERVED_MODALITY_NAMES or name.endswith(MASK_SUFFIX):
            raise ValueError(
                f"modality name ({name!r}) must not be one of {sorted(RESERVED_MODALITY_NAMES)} nor end in "
                f"'{MASK_SUFFIX}' (the model takes '<name>{MASK_SUFFIX}' as that modality's mask)"
            )
        for key in ("channels", "num_axes"):
            if not _is_positive_int(spec[key]):
                raise ValueError(f"{where}: {key} ({spec[key]!r}) must be a positive integer")
        bands = spec["num_freq_bands"]
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 0:
            raise ValueError(f"{where}: num_freq_bands ({bands!r}) must be an integer >= 0")
        max_freq = spec["max_freq"]
        if isinstance(max_freq, bool) or not isinstance(max_freq, (int, float)) or not max_freq > 0:
            raise ValueError(f"{where}: max_freq ({max_freq!r}) must be a positive number")
        for key in ("vocab_size", "max_length"):
            if spec.get(key) is not None and not _is_positive_int(spec[key]):
                raise ValueError(f"{where}: {key} ({spec[key]!r}) must be a positive integer or None")
        patch_size = spec.get("patch_size", 1)
        if not _is_positive_int(patch_size):
            raise ValueError(f"{where}: patch_size ({patch_size!r}) must be a positive integer")
        split = spec.get("split_across_layers", False)
        spectrogram = spec.get("spectrogram", False)
        for key, flag in (("split_across_layers", split), ("spectrogram", spectrogram)):
            if not isinstance(flag, bool):
                raise ValueError(f"{where}: {key} ({flag!r}) must be true or false")
        num_axes = spec["num_axes"]
        if spec.get("vocab_size") is not None and num_axes != 1:
            raise ValueError(f"{where}: token inputs (vocab_size given) have one axis, got num_axes={num_axes}")
        if num_axes != 1 and (patch_size != 1 or spec.get("max_length") is not None):
            raise ValueError(f"{where}: patch_size and max_length apply to 1-axis inputs only, got num_axes={num_axes}")
        if spectrogram and (spec.get("vocab_size") is not None or num_axes != 1 or patch_size < 2):
            raise ValueError(
                f"{where}: spectrogram needs 1-axis continuous inputs with patch_size >= 2, got num_axes={num_axes}, "
                f"patch_size={patch_size}, vocab_size={spec.get('vocab_size')!r}"
            )
        if split:
            if spec.get("vocab_size") is None:
                raise ValueError(f"{where}: split_across_layers needs token inputs (give vocab_size)")
            if patch_size != 1:
                raise ValueError(f"{where}: split_across_layers cannot be combined with patch_size ({patch_size})")
            if spec["channels"] % num_cross_attention_layers != 0:
                raise ValueError(
                    f"{where}: split_across_layers needs channels ({spec['channels']}) divisible by the number of "
                    f"cross-attention layers ({num_cross_attention_layers})"
                )
        return cls(
            name=name,
            channels=spec["channels"],
            num_axes=num_axes,
            num_freq_bands=bands,
            max_freq=float(max_freq),
            vocab_size=spec.get("vocab_size"),
            split_across_layers=split,
            max_length=spec.get("max_length"),
            patch_size=patch_size,
            spectrogram=spectrogram,
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for `config.json` (the inverse of `from_dict`)."""
        return asdict(self)

    @property
    def is_tokens(self) -> bool:
        return self.vocab_size is not None

    @property
    def kind(self) -> str:
        """The key of the modality's feature class in `MODALITY_FEATURES`: `"tokens"` or `"continuous"`."""
        return "tokens" if self.is_tokens else "continuous"

    def num_data_channels(self, num_layers: int) -> int:
        """Data channels per position that each cross-attention layer sees."""
        if self.split_across_layers:
            return self.channels // num_layers
        if self.spectrogram:
            return self.channels * (self.patch_size // 2 + 1)
        return self.channels * self.patch_size

    @property
    def num_position_channels(self) -> int:
        # DeepMind/lucidrains Fourier features: per axis, the position, then sine and cosine of each band.
        return self.num_axes * (2 * self.num_freq_bands + 1) if self.num_freq_bands > 0 else 0


def validate_modalities(
    modalities: Sequence[Mapping[str, Any]], num_cross_attention_layers: int = 1
) -> list[ModalitySpec]:
    """Validate a `PerceiverConfig.modalities` list; returns the specs. Raises a `ValueError` for the first problem."""
    if isinstance(modalities, (str, bytes, Mapping)) or not isinstance(modalities, Sequence) or not modalities:
        raise ValueError(f"modalities ({modalities!r}) must be a non-empty list of dicts")
    specs = [ModalitySpec.from_dict(m, num_cross_attention_layers) for m in modalities]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"modality names must be unique, got {duplicates} more than once in {names}")
    return specs


class ModalityFeatures(nn.Module):
    """One continuous modality's features, before the adapter pads them to the common width.

    Maps the modality's data and optional mask to `(features (B, N_m, d_m), positions (N_m, P) or None,
    mask (B, N_m) or None)`. It has no parameters (so no state-dict entries): the Fourier features are a pure
    function of the grid. It composes the pieces the single-modality adapters use:

    - the layout: `move_channels_last`, as `ImageInputAdapter` (plus `(B, *A)` data when `c == 1`);
    - 1-axis data with `patch_size > 1`: `patch_features` (patches or their log power spectra, the patch mask), as
      `AudioInputAdapter`;
    - `FourierPositionEncoding` of the (patched) grid, with a `fixed_length` grid when `max_length` is set, as
      `AudioInputAdapter`.

    Not shared on purpose: positions are Fourier features of `max_freq` (the image adapter derives its frequencies
    from the configured grid) and the data are not projected (the image and audio adapters may project them).
    """

    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()
        self.spec = spec
        self.position_encoding = (
            FourierPositionEncoding(
                spec.num_axes,
                spec.num_freq_bands,
                (spec.max_freq,) * spec.num_axes,
                fixed_length=None if spec.max_length is None else math.ceil(spec.max_length / spec.patch_size),
            )
            if spec.num_freq_bands > 0
            else None
        )

    def layout(self, data: torch.Tensor, dtype: torch.dtype, embedding: nn.Module | None = None) -> torch.Tensor:
        """Raw data -> channels-last features `(B, *A, c)` in `dtype`, with clear shape errors."""
        name, c, k = self.spec.name, self.spec.channels, self.spec.num_axes
        if not data.is_floating_point():
            raise ValueError(f"modality {name!r} takes floating point data, got dtype {data.dtype}")
        if data.ndim == k + 1 and c == 1:
            data = data.unsqueeze(-1)
        if data.ndim != k + 2:
            raise ValueError(
                f"modality {name!r} has {k} axes and {c} channels: expected shape (batch, *axes, {c}) or "
                f"(batch, {c}, *axes) with {k} axes, got {tuple(data.shape)}"
            )
        channels_last = move_channels_last(data, c)
        if channels_last is None:
            raise ValueError(
                f"modality {name!r}: data of shape {tuple(data.shape)} has no axis of {c} channels at position 1 or -1"
            )
        return channels_last.to(dtype)

    def position_mask(self, mask: torch.Tensor, batch_size: int, axes: Sequence[int]) -> torch.Tensor:
        """The modality's mask `(B,)`, `(B, *A)` or `(B, prod(A))` -> `(B, prod(A))` booleans (before patching)."""
        num_positions = math.prod(axes)
        if mask.shape == (batch_size,):
            return mask.bool()[:, None].expand(batch_size, num_positions)
        if tuple(mask.shape) in ((batch_size, *axes), (batch_size, num_positions)):
            return mask.bool().reshape(batch_size, num_positions)
        raise ValueError(
            f"the mask of modality {self.spec.name!r} must have shape ({batch_size},) (per example) or "
            f"({batch_size}, {', '.join(map(str, axes))}) (per position), got {tuple(mask.shape)}"
        )

    def forward(
        self,
        data: torch.Tensor,
        mask: torch.Tensor | None,
        batch_size: int,
        dtype: torch.dtype,
        embedding: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`(features (B, N_m, d_m), Fourier positions (N_m, P) or None, mask (B, N_m) or None)`."""
        spec = self.spec
        x = self.layout(data, dtype, embedding)  # (B, *A, c)
        axes = tuple(x.shape[1:-1])
        if 0 in axes:
            raise ValueError(f"modality {spec.name!r} has an empty axis: shape {tuple(data.shape)}")
        mask = None if mask is None else self.position_mask(mask, batch_size, axes)
        if spec.max_length is not None and axes[0] > spec.max_length:
            raise ValueError(
                f"modality {spec.name!r} has length {axes[0]}, more than its max_length ({spec.max_length})"
            )
        if spec.patch_size > 1:
            x, mask = patch_features(x, spec.patch_size, mask, spec.spectrogram)  # (B, N_m, P*c or c*(P/2+1))
            axes = (x.shape[1],)
        x = x.reshape(batch_size, -1, x.shape[-1])  # (B, N_m, d_m)
        positions = None if self.position_encoding is None else self.position_encoding(axes, x.device, dtype)
        return x, positions, mask


class TokenModalityFeatures(ModalityFeatures):
    """A token modality (text): ids `(B, L)` or `(B, L, 1)` are embedded, then handled as 1-axis continuous data.

    The embedding module is the adapter's (`token_embeddings[name]`, its state-dict key), passed to `forward`.
    Unlike `TextInputAdapter`, whose positions are a learned table, positions are Fourier features, as in the
    multi-modality Perceiver fork; the two adapters share only the embedding lookup (`nn.Embedding`).
    """

    def layout(self, data: torch.Tensor, dtype: torch.dtype, embedding: nn.Module | None = None) -> torch.Tensor:
        name = self.spec.name
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise ValueError(f"modality {name!r} takes integer token ids, got dtype {data.dtype}")
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data.squeeze(-1)  # the fork's (B, L, 1) layout
        if data.ndim != 2:
            raise ValueError(f"modality {name!r} takes token ids of shape (batch, length), got {tuple(data.shape)}")
        return embedding(data).to(dtype)  # (B, L, c)


# The feature class of each kind of modality (`ModalitySpec.kind`).
MODALITY_FEATURES: dict[str, type[ModalityFeatures]] = {
    "continuous": ModalityFeatures,
    "tokens": TokenModalityFeatures,
}


class MultimodalInputAdapter(InputAdapter):
    """Maps a dict `{modality name: tensor}` to one `(B, N, C)` array and its joint attention mask.

    Layouts accepted per modality (`A` = its axes, `c` = its channels):

    - continuous data: channels-last `(B, *A, c)` (the original Perceiver's layout), channels-first `(B, c, *A)`
      (what image processors return; recognised when the last axis is not `c`), or `(B, *A)` when `c == 1`;
    - token ids: `(B, L)` or `(B, L, 1)` integers.

    Masks (optional, per modality): `(B,)` (1 where the example has this modality) or `(B, *A)` / `(B, prod(A))`
    per position (1 for real positions, 0 for padding).

    Args:
        modalities: the modalities, as `ModalitySpec`s or config dicts.
        num_layers: number of cross-attention layers (for text split across layers).
        use_modality_embedding: add the learned per-modality embedding.
        token_embeddings: optional embedding modules, by modality name, to use for token modalities instead of
            new `nn.Embedding(vocab_size, channels)` ones (e.g. a pretrained embedding).
    """

    adapts_attention_mask = True

    def __init__(
        self,
        modalities: Sequence[ModalitySpec | Mapping[str, Any]],
        num_layers: int = 1,
        use_modality_embedding: bool = True,
        token_embeddings: Mapping[str, nn.Module] | None = None,
    ) -> None:
        if not _is_positive_int(num_layers):
            raise ValueError(f"num_layers ({num_layers!r}) must be a positive integer")
        specs = validate_modalities(
            [m.to_dict() if isinstance(m, ModalitySpec) else m for m in modalities],
            num_cross_attention_layers=num_layers,
        )
        widths = {s.name: s.num_data_channels(num_layers) + s.num_position_channels for s in specs}
        super().__init__(max(widths.values()))
        self.specs = {s.name: s for s in specs}
        self.num_layers = num_layers
        self.widths = widths
        self.splits_across_layers = any(s.split_across_layers for s in specs)

        token_embeddings = dict(token_embeddings or {})
        unknown = sorted(set(token_embeddings) - {s.name for s in specs if s.is_tokens})
        if unknown:
            raise ValueError(f"token_embeddings given for {unknown}, which are not token modalities")
        self.token_embeddings = nn.ModuleDict(
            {
                s.name: token_embeddings.get(s.name) or nn.Embedding(s.vocab_size, s.channels)
                for s in specs
                if s.is_tokens
            }
        )
        # No parameters (no state-dict entries): the Fourier features are a pure function of the grid.
        self.features = nn.ModuleDict({s.name: MODALITY_FEATURES[s.kind](s) for s in specs})
        # One (1, C) embedding per modality, keyed by name: the same vector whichever other modalities are present.
        # nn.Embedding (not a bare Parameter) so that transformers' default weight initialisation covers it.
        self.modality_embedding = (
            nn.ModuleDict({s.name: nn.Embedding(1, self.num_input_channels) for s in specs})
            if use_modality_embedding
            else None
        )
        if self.modality_embedding is not None:
            for embedding in self.modality_embedding.values():
                nn.init.normal_(embedding.weight, std=0.02)

    config_settings = {"modalities": None}

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        if not config.modalities:
            raise ValueError(f"input_adapter='multimodal' needs a non-empty modalities list, got {config.modalities!r}")
        # Checks every entry (names, sizes, text options) and that split text fits the cross-attention layers.
        validate_modalities(config.modalities, num_cross_attention_layers=config.num_cross_attention_layers)

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> MultimodalInputAdapter:
        return cls(config.modalities, num_layers=config.num_cross_attention_layers)

    @property
    def modality_names(self) -> list[str]:
        return list(self.specs)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self, inputs: Mapping[str, torch.Tensor], attention_mask: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        """
        Args:
            inputs: `{modality name: data}` for the modalities present (at least one).
            attention_mask: `{modality name: mask}` for any of them (see the class docstring).

        Returns:
            `(x, mask)`: `x` is `(B, N, C)`, or a list of `num_layers` such arrays when a modality is split across
            layers; `mask` is the joint `(B, N)` boolean mask, or `None` when no modality had a mask.
        """
        if not isinstance(inputs, Mapping):
            raise ValueError(f"inputs must be a dict {{modality name: tensor}}, got {type(inputs).__name__}")
        attention_mask = dict(attention_mask or {})
        unknown = sorted((set(inputs) | set(attention_mask)) - set(self.specs))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this model takes {self.modality_names}")
        masks_without_data = sorted(set(attention_mask) - set(inputs))
        if masks_without_data:
            raise ValueError(f"masks given for modalities {masks_without_data} that are not in the inputs")
        present = [self.specs[name] for name in self.specs if inputs.get(name) is not None]
        if not present:
            raise ValueError(f"inputs hold none of the modalities {self.modality_names}")
        batch_sizes = {name: data.shape[0] for name, data in inputs.items() if data is not None}
        if len(set(batch_sizes.values())) != 1:
            raise ValueError(f"every modality must have the same batch size, got {batch_sizes}")
        b = next(iter(batch_sizes.values()))
        if b == 0:
            raise ValueError("inputs must hold at least one example")

        dtype = self._dtype(inputs)
        device = next(data.device for data in inputs.values() if data is not None)
        pieces = []  # (spec, features (B, N_m, c_m) full width, positions (N_m, P) or None, mask (B, N_m) or None)
        for spec in present:
            embedding = self.token_embeddings[spec.name] if spec.is_tokens else None
            x, positions, mask = self.features[spec.name](
                inputs[spec.name], attention_mask.get(spec.name), b, dtype, embedding
            )
            pieces.append((spec, x, positions, mask))

        if self.splits_across_layers:
            outputs: torch.Tensor | list[torch.Tensor] = [
                self._assemble(pieces, b, layer) for layer in range(self.num_layers)
            ]
        else:
            outputs = self._assemble(pieces, b, None)
        if all(mask is None for *_, mask in pieces):
            return outputs, None
        joint = torch.cat(
            [
                mask if mask is not None else torch.ones(b, x.shape[1], dtype=torch.bool, device=device)
                for _, x, _, mask in pieces
            ],
            dim=1,
        )  # (B, N)
        return outputs, joint

    def _assemble(self, pieces: list, batch_size: int, layer: int | None) -> torch.Tensor:
        """Write every modality's features, position features and embedding into one `(B, N, C)` array.

        One preallocated array (instead of concatenating padded copies) keeps the peak memory at one copy of
        the input, which matters for inputs of millions of positions (video).
        """
        total = sum(x.shape[1] for _, x, _, _ in pieces)
        ref = pieces[0][1]
        out = ref.new_zeros(batch_size, total, self.num_input_channels)  # (B, N, C)
        start = 0
        for spec, x, positions, _ in pieces:
            n = x.shape[1]
            if spec.split_across_layers and layer is not None:
                width = spec.num_data_channels(self.num_layers)
                x = x[..., layer * width : (layer + 1) * width]  # this layer's slice of the embedding
            c = x.shape[-1]
            out[:, start : start + n, :c] = x
            if positions is not None:
                out[:, start : start + n, c : c + positions.shape[-1]] = positions
            if self.modality_embedding is not None:
                out[:, start : start + n] += self.modality_embedding[spec.name].weight  # (1, C) broadcast
            start += n
        return out

    def _dtype(self, inputs: Mapping[str, torch.Tensor]) -> torch.dtype:
        """The adapter's parameter dtype (so a bf16 model gets bf16 inputs), else the first float input's."""
        for parameter in self.parameters():
            return parameter.dtype
        for data in inputs.values():
            if data is not None and data.is_floating_point():
                return data.dtype
        return torch.get_default_dtype()
