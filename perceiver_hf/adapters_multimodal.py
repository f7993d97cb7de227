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

Options for DeepMind's multimodal autoencoder (video, audio and a label; defaults keep the behaviour above):
per-axis `max_freq` and `patch_size` (space-time patches of video frames), `one_hot` inputs (a label vector, one
position, no position features), a learned `mask_token` that replaces the positions marked in `masked` (and,
in training, a random `mask_prob` of them), and `modality_encoding="concat"`: each modality padded to the common
width with a learned per-modality vector (at least `modality_padding` channels) instead of zeros plus an added
embedding.

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
    "merge_modality_inputs",
    "MODALITY_ENCODINGS",
    "AutoencodingOutputSpec",
    "validate_autoencoding_outputs",
    "space_to_depth",
]

# Model keyword arguments that a modality name would shadow (modalities are also passed as keywords).
RESERVED_MODALITY_NAMES = frozenset(
    {"inputs", "attention_mask", "labels", "output_attentions", "output_hidden_states", "return_dict", "kwargs"}
)
MASK_SUFFIX = "_mask"


def merge_modality_inputs(
    names: Sequence[str],
    inputs: Mapping[str, torch.Tensor] | None,
    attention_mask: Mapping[str, torch.Tensor] | None,
    keyword_inputs: Mapping[str, torch.Tensor | None],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A multimodal model's inputs as two dicts `(data, masks)` keyed by modality name: the `inputs` and
    `attention_mask` dicts, plus the `<name>=` / `<name>_mask=` keywords of its `forward(**modalities)` (those that
    are `None` are skipped). A keyword that names none of the modalities `names`, or a modality given both as a
    keyword and in a dict, is a `ValueError`."""
    data, masks = dict(inputs or {}), dict(attention_mask or {})
    for key, value in keyword_inputs.items():
        if value is None:
            continue
        if key in names:
            target, name = data, key
        elif key.endswith(MASK_SUFFIX) and key[: -len(MASK_SUFFIX)] in names:
            target, name = masks, key[: -len(MASK_SUFFIX)]
        else:
            raise ValueError(
                f"unexpected argument {key!r}: this model takes the modalities {names} (and '<name>{MASK_SUFFIX}' "
                "masks) as keywords"
            )
        if name in target:
            raise ValueError(f"{key!r} was given twice (as a keyword and in a dict)")
        target[name] = value
    return data, masks


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


# `ModalitySpec` options added for multimodal autoencoding, with their defaults: `to_dict` leaves them out at these.
_OPTIONAL_DEFAULTS = {"one_hot": False, "mask_token": False, "mask_prob": 0.0}


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
        one_hot: the input is one vector of `channels` class scores per example (a one-hot label), `(B, channels)`
            (or class ids `(B,)`), at one position without position features (`num_axes=1`, `num_freq_bands=0`).
        mask_token: a learned vector of the common width replaces the positions of this modality that the
            `masked` input marks (BERT-style masking, as DeepMind's multimodal autoencoder masks the label).
        mask_prob: in training mode, the probability that each position of this modality is masked at random
            (needs `mask_token`); `masked` given for the modality overrides it.

    `max_freq` may also be a list, one entry per axis; inputs of several axes take `patch_size` as a list, one entry per
    axis (e.g. video `(time, height, width)`: space-time patches of `patch_size[0]` frames x `patch_size[1:]` pixels).
    """

    name: str
    channels: int
    num_axes: int
    num_freq_bands: int
    max_freq: float | tuple[float, ...]
    vocab_size: int | None = None
    split_across_layers: bool = False
    max_length: int | None = None
    patch_size: int | tuple[int, ...] = 1
    spectrogram: bool = False
    one_hot: bool = False
    mask_token: bool = False
    mask_prob: float = 0.0

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
        num_axes = spec["num_axes"]
        max_freq = spec["max_freq"]
        if isinstance(max_freq, Sequence) and not isinstance(max_freq, str):
            if len(max_freq) != num_axes or not all(_is_positive_number(f) for f in max_freq):
                raise ValueError(
                    f"{where}: max_freq ({max_freq!r}) must be a positive number or a list of {num_axes} positive "
                    "numbers (one per axis)"
                )
            max_freq = tuple(float(f) for f in max_freq)
        elif not _is_positive_number(max_freq):
            raise ValueError(f"{where}: max_freq ({max_freq!r}) must be a positive number")
        else:
            max_freq = float(max_freq)
        for key in ("vocab_size", "max_length"):
            if spec.get(key) is not None and not _is_positive_int(spec[key]):
                raise ValueError(f"{where}: {key} ({spec[key]!r}) must be a positive integer or None")
        patch_size = spec.get("patch_size", 1)
        if isinstance(patch_size, Sequence) and not isinstance(patch_size, str):
            if len(patch_size) != num_axes or not all(_is_positive_int(p) for p in patch_size):
                raise ValueError(
                    f"{where}: patch_size ({patch_size!r}) must be a positive integer or a list of {num_axes} "
                    "positive integers (one per axis)"
                )
            patch_size = tuple(patch_size) if num_axes > 1 else patch_size[0]
        elif not _is_positive_int(patch_size):
            raise ValueError(f"{where}: patch_size ({patch_size!r}) must be a positive integer")
        split = spec.get("split_across_layers", False)
        spectrogram = spec.get("spectrogram", False)
        one_hot = spec.get("one_hot", False)
        mask_token = spec.get("mask_token", False)
        for key, flag in (
            ("split_across_layers", split), ("spectrogram", spectrogram), ("one_hot", one_hot),
            ("mask_token", mask_token),
        ):  # fmt: skip
            if not isinstance(flag, bool):
                raise ValueError(f"{where}: {key} ({flag!r}) must be true or false")
        mask_prob = spec.get("mask_prob", 0.0)
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"{where}: mask_prob ({mask_prob!r}) must be a number in [0, 1]")
        if mask_prob > 0 and not mask_token:
            raise ValueError(
                f"{where}: mask_prob ({mask_prob}) needs mask_token=true (the vector masked positions get)"
            )
        if spec.get("vocab_size") is not None and num_axes != 1:
            raise ValueError(f"{where}: token inputs (vocab_size given) have one axis, got num_axes={num_axes}")
        if num_axes != 1 and spec.get("max_length") is not None:
            raise ValueError(f"{where}: max_length applies to 1-axis inputs only, got num_axes={num_axes}")
        if num_axes != 1 and isinstance(patch_size, int) and patch_size != 1:
            raise ValueError(
                f"{where}: an integer patch_size ({patch_size}) applies to 1-axis inputs only, got "
                f"num_axes={num_axes}; give a list of {num_axes} patch sizes (one per axis) for space-time patches"
            )
        if one_hot and (num_axes != 1 or bands != 0 or patch_size != 1 or spec.get("vocab_size") is not None):
            raise ValueError(
                f"{where}: one_hot inputs are one vector per example: they need num_axes=1, num_freq_bands=0, "
                f"patch_size=1 and no vocab_size, got num_axes={num_axes}, num_freq_bands={bands}, "
                f"patch_size={patch_size!r}, vocab_size={spec.get('vocab_size')!r}"
            )
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
            max_freq=max_freq,
            vocab_size=spec.get("vocab_size"),
            split_across_layers=split,
            max_length=spec.get("max_length"),
            patch_size=patch_size,
            spectrogram=spectrogram,
            one_hot=one_hot,
            mask_token=mask_token,
            mask_prob=float(mask_prob),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for `config.json` (the inverse of `from_dict`). The autoencoding options are left out at
        their defaults, so the dicts of other models read as before they existed."""
        spec = asdict(self)
        for key, default in _OPTIONAL_DEFAULTS.items():
            if spec[key] == default:
                del spec[key]
        for key in ("max_freq", "patch_size"):
            if isinstance(spec[key], tuple):
                spec[key] = list(spec[key])
        return spec

    @property
    def max_freqs(self) -> tuple[float, ...]:
        """`max_freq` of each axis."""
        return self.max_freq if isinstance(self.max_freq, tuple) else (self.max_freq,) * self.num_axes

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        """`patch_size` of each axis."""
        return self.patch_size if isinstance(self.patch_size, tuple) else (self.patch_size,) * self.num_axes

    @property
    def patch_volume(self) -> int:
        """Positions grouped into one patch (the product of the per-axis patch sizes)."""
        return math.prod(self.patch_sizes)

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
        return self.channels * self.patch_volume

    @property
    def num_position_channels(self) -> int:
        # DeepMind/lucidrains Fourier features: per axis, the position, then sine and cosine of each band.
        return self.num_axes * (2 * self.num_freq_bands + 1) if self.num_freq_bands > 0 else 0


MODALITY_ENCODINGS = ("add", "concat")


def _check_modality_encoding(modality_encoding: Any, modality_padding: Any) -> None:
    if modality_encoding not in MODALITY_ENCODINGS:
        raise ValueError(f"modality_encoding ({modality_encoding!r}) must be one of {list(MODALITY_ENCODINGS)}")
    if isinstance(modality_padding, bool) or not isinstance(modality_padding, int) or modality_padding < 0:
        raise ValueError(f"modality_padding ({modality_padding!r}) must be an integer >= 0")
    if modality_encoding == "concat" and modality_padding < 1:
        raise ValueError(
            f"modality_encoding='concat' needs modality_padding >= 1 (got {modality_padding}): the learned padding is "
            "what tags each modality, so even the widest one needs some"
        )


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
                spec.max_freqs,
                fixed_length=None if spec.max_length is None else math.ceil(spec.max_length / spec.patch_size),
            )
            if spec.num_freq_bands > 0
            else None
        )

    def layout(self, data: torch.Tensor, dtype: torch.dtype, embedding: nn.Module | None = None) -> torch.Tensor:
        """Raw data -> channels-last features `(B, *A, c)` in `dtype`, with clear shape errors."""
        name, c, k = self.spec.name, self.spec.channels, self.spec.num_axes
        if self.spec.one_hot:
            return self._one_hot_layout(data, dtype)
        if not data.is_floating_point():
            raise ValueError(f"modality {name!r} takes floating point data, got dtype {data.dtype}")
        if data.ndim == k + 1 and c == 1:
            data = data.unsqueeze(-1)
        if k == 3 and data.ndim == 5 and data.shape[-1] != c and data.shape[1] != c and data.shape[2] == c:
            data = data.permute(0, 1, 3, 4, 2)  # video frames (B, T, c, H, W), as transformers takes them
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

    def _one_hot_layout(self, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A one-hot modality: `(B, K)` scores, `(B, 1, K)`, or class ids `(B,)` -> `(B, 1, K)`."""
        name, k = self.spec.name, self.spec.channels
        if data.ndim == 1 and not data.is_floating_point():
            if data.numel() and (data.min() < 0 or data.max() >= k):
                raise ValueError(
                    f"modality {name!r} takes class ids in [0, {k}), got values from {int(data.min())} to "
                    f"{int(data.max())}"
                )
            return nn.functional.one_hot(data.long(), k).to(dtype)[:, None]
        if data.ndim == 2 and data.shape[-1] == k:
            data = data[:, None]
        if data.ndim != 3 or data.shape[1:] != (1, k) or not data.is_floating_point():
            raise ValueError(
                f"modality {name!r} is one vector of {k} class scores per example: expected floats of shape "
                f"(batch, {k}) or (batch, 1, {k}), or class ids of shape (batch,), got {tuple(data.shape)} "
                f"{data.dtype}"
            )
        return data.to(dtype)

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
        if spec.num_axes == 1 and spec.patch_size > 1:
            x, mask = patch_features(x, spec.patch_size, mask, spec.spectrogram)  # (B, N_m, P*c or c*(P/2+1))
            axes = (x.shape[1],)
        elif spec.patch_volume > 1:
            x = space_to_depth(x, spec.patch_sizes, spec.name)  # (B, *A/p, prod(p)*c)
            if mask is not None:
                mask = space_to_depth(mask.reshape(batch_size, *axes, 1), spec.patch_sizes, spec.name).any(-1)
            axes = tuple(x.shape[1:-1])
            mask = None if mask is None else mask.reshape(batch_size, -1)
        x = x.reshape(batch_size, -1, x.shape[-1])  # (B, N_m, d_m)
        positions = None if self.position_encoding is None else self.position_encoding(axes, x.device, dtype)
        return x, positions, mask


def space_to_depth(x: torch.Tensor, patch_sizes: Sequence[int], name: str = "input") -> torch.Tensor:
    """Channels-last `(B, *A, c)` -> `(B, *(A / p), prod(p) * c)`: non-overlapping patches of `p[i]` positions per
    axis, their values in the order (patch axis 0, ..., patch axis k-1, channel), as DeepMind's `space_to_depth`
    (for video, `(frames, rows, columns, channels)` within a patch)."""
    b, *axes, c = x.shape
    if any(a % p for a, p in zip(axes, patch_sizes, strict=True)):
        raise ValueError(
            f"modality {name!r} has axes {tuple(axes)}, which patches of {tuple(patch_sizes)} do not divide: each axis "
            "must be a multiple of its patch size"
        )
    split = [d for a, p in zip(axes, patch_sizes, strict=True) for d in (a // p, p)]
    x = x.reshape(b, *split, c)
    k = len(axes)
    order = [0] + [1 + 2 * i for i in range(k)] + [2 + 2 * i for i in range(k)] + [2 * k + 1]
    return x.permute(order).reshape(b, *(a // p for a, p in zip(axes, patch_sizes, strict=True)), -1)


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
        modality_encoding: `"add"`: zero-pad each modality to the common width and add its learned embedding;
            `"concat"`: pad each modality with its own learned vector (DeepMind's multimodal preprocessor), the
            common width being the widest modality plus `modality_padding` channels.
        modality_padding: `"concat"`: channels of learned padding that even the widest modality gets (>= 1, so that
            every modality is tagged).
    """

    adapts_attention_mask = True

    def __init__(
        self,
        modalities: Sequence[ModalitySpec | Mapping[str, Any]],
        num_layers: int = 1,
        use_modality_embedding: bool = True,
        token_embeddings: Mapping[str, nn.Module] | None = None,
        modality_encoding: str = "add",
        modality_padding: int = 0,
    ) -> None:
        if not _is_positive_int(num_layers):
            raise ValueError(f"num_layers ({num_layers!r}) must be a positive integer")
        _check_modality_encoding(modality_encoding, modality_padding)
        specs = validate_modalities(
            [m.to_dict() if isinstance(m, ModalitySpec) else m for m in modalities],
            num_cross_attention_layers=num_layers,
        )
        widths = {s.name: s.num_data_channels(num_layers) + s.num_position_channels for s in specs}
        super().__init__(max(widths.values()) + (modality_padding if modality_encoding == "concat" else 0))
        self.modality_encoding = modality_encoding
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
            if use_modality_embedding and modality_encoding == "add"
            else None
        )
        if self.modality_embedding is not None:
            for embedding in self.modality_embedding.values():
                nn.init.normal_(embedding.weight, std=0.02)
        # "concat": one learned (1, C - c_m) padding vector per modality (its tag), as DeepMind's `padding`.
        self.modality_padding = (
            nn.ParameterDict(
                {s.name: nn.Parameter(torch.randn(1, self.num_input_channels - widths[s.name]) * 0.02) for s in specs}
            )
            if modality_encoding == "concat"
            else None
        )
        # Learned (1, C) mask tokens of the modalities that have one (no state-dict entries otherwise).
        self.mask_tokens = nn.ParameterDict(
            {s.name: nn.Parameter(torch.randn(1, self.num_input_channels) * 0.02) for s in specs if s.mask_token}
        )

    config_settings = {"modalities": None, "modality_encoding": "add", "modality_padding": 0}

    @classmethod
    def validate_config(cls, config: PerceiverConfig) -> None:
        if not config.modalities:
            raise ValueError(f"input_adapter='multimodal' needs a non-empty modalities list, got {config.modalities!r}")
        # Checks every entry (names, sizes, text options) and that split text fits the cross-attention layers.
        validate_modalities(config.modalities, num_cross_attention_layers=config.num_cross_attention_layers)
        _check_modality_encoding(config.modality_encoding, config.modality_padding)

    @classmethod
    def from_config(cls, config: PerceiverConfig) -> MultimodalInputAdapter:
        return cls(
            config.modalities,
            num_layers=config.num_cross_attention_layers,
            modality_encoding=config.modality_encoding,
            modality_padding=config.modality_padding,
        )

    @property
    def modality_names(self) -> list[str]:
        return list(self.specs)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        attention_mask: Mapping[str, torch.Tensor] | None = None,
        masked: Mapping[str, torch.Tensor | bool] | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        """
        Args:
            inputs: `{modality name: data}` for the modalities present (at least one).
            attention_mask: `{modality name: mask}` for any of them (see the class docstring).
            masked: `{modality name: True, (B,) or (B, N_m) booleans}`: positions replaced by the modality's learned
                mask token (modalities with `mask_token` only). Without an entry, a modality with `mask_prob > 0` is
                masked at random in training mode.

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

        masked = dict(masked or {})
        without_token = sorted(name for name in masked if name not in self.mask_tokens)
        if without_token:
            raise ValueError(
                f"masked names modalities {without_token} without a mask token; modalities with mask_token: "
                f"{list(self.mask_tokens)}"
            )

        dtype = self._dtype(inputs)
        device = next(data.device for data in inputs.values() if data is not None)
        pieces = []  # (spec, features (B, N_m, c_m) full width, positions (N_m, P) or None, mask (B, N_m) or None)
        replaced = {}  # modality name -> (B, N_m) booleans: positions that get the mask token
        for spec in present:
            embedding = self.token_embeddings[spec.name] if spec.is_tokens else None
            x, positions, mask = self.features[spec.name](
                inputs[spec.name], attention_mask.get(spec.name), b, dtype, embedding
            )
            pieces.append((spec, x, positions, mask))
            token_mask = self._token_mask(spec, masked.get(spec.name), b, x.shape[1], x.device)
            if token_mask is not None:
                replaced[spec.name] = token_mask
        not_given = sorted(set(masked) - {spec.name for spec in present})
        if not_given:
            raise ValueError(f"masked names modalities {not_given} that are not in the inputs")

        if self.splits_across_layers:
            outputs: torch.Tensor | list[torch.Tensor] = [
                self._assemble(pieces, b, layer, replaced) for layer in range(self.num_layers)
            ]
        else:
            outputs = self._assemble(pieces, b, None, replaced)
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

    def _assemble(
        self, pieces: list, batch_size: int, layer: int | None, replaced: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
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
            if self.modality_padding is not None:
                width = self.widths[spec.name]
                out[:, start : start + n, width:] = self.modality_padding[spec.name].to(out.dtype)  # (1, C - c_m)
            token_mask = (replaced or {}).get(spec.name)
            if token_mask is not None:
                token = self.mask_tokens[spec.name].to(out.dtype)  # (1, C)
                out[:, start : start + n] = torch.where(token_mask[..., None], token, out[:, start : start + n])
            start += n
        return out

    def _token_mask(
        self, spec: ModalitySpec, given: torch.Tensor | bool | None, batch_size: int, n: int, device: torch.device
    ) -> torch.Tensor | None:
        """`(B, N_m)` booleans: where the modality's mask token replaces its features; `None`: nowhere."""
        if spec.name not in self.mask_tokens:
            return None
        if given is None:
            if not (self.training and spec.mask_prob > 0):
                return None
            return torch.rand(batch_size, n, device=device) < spec.mask_prob  # DeepMind: each position at random
        given = torch.as_tensor(given, device=device).bool()
        if given.ndim == 0:
            return given.expand(batch_size, n)
        if given.shape == (batch_size,):
            return given[:, None].expand(batch_size, n)
        if given.shape == (batch_size, n):
            return given
        raise ValueError(
            f"masked[{spec.name!r}] must be a bool, ({batch_size},) per example or ({batch_size}, {n}) per position "
            f"(after patching), got shape {tuple(given.shape)}"
        )

    def _dtype(self, inputs: Mapping[str, torch.Tensor]) -> torch.dtype:
        """The adapter's parameter dtype (so a bf16 model gets bf16 inputs), else the first float input's."""
        for parameter in self.parameters():
            return parameter.dtype
        for data in inputs.values():
            if data is not None and data.is_floating_point():
                return data.dtype
        return torch.get_default_dtype()


# ---------------------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class AutoencodingOutputSpec:
    """One output modality of a multimodal autoencoder (`PerceiverConfig.autoencoding_outputs`, a plain dict each).

    Args:
        name: the input modality it reconstructs.
        shape: continuous modalities: the output's size per axis (e.g. `[frames, height, width]`, `[samples]`).
        patch_size: values decoded by one query per axis (an int for every axis, or a list): DeepMind decodes video
            per pixel (1) and audio in patches of `samples_per_patch`.
        num_freq_bands / max_freq: the queries' Fourier features (defaults: the input modality's).
        query_channels: one-hot modalities: width of the learned query (DeepMind: 1024).
        loss_weight: weight of this modality's loss in the total (mean squared error of continuous modalities,
            cross-entropy of one-hot ones).
    """

    name: str
    shape: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    num_freq_bands: int = 0
    max_freq: tuple[float, ...] | None = None
    query_channels: int | None = None
    loss_weight: float = 1.0
    channels: int = 1
    one_hot: bool = False

    @property
    def grid(self) -> tuple[int, ...]:
        """Query positions per axis (`shape / patch_size`); `(1,)` for one-hot modalities."""
        if self.one_hot:
            return (1,)
        return tuple(s // p for s, p in zip(self.shape, self.patch_size, strict=True))

    @property
    def num_points(self) -> int:
        return math.prod(self.grid)

    @property
    def values_per_point(self) -> int:
        """Outputs per query: `prod(patch_size) * channels`, or the number of classes."""
        return self.channels if self.one_hot else math.prod(self.patch_size) * self.channels

    @property
    def num_query_channels(self) -> int:
        if self.one_hot:
            return self.query_channels
        return len(self.shape) * (2 * self.num_freq_bands + 1) if self.num_freq_bands > 0 else len(self.shape)


def validate_autoencoding_outputs(
    outputs: Sequence[Mapping[str, Any]], modalities: Sequence[Mapping[str, Any]]
) -> list[AutoencodingOutputSpec]:
    """Check `PerceiverConfig.autoencoding_outputs` against the input modalities; returns the output specs.

    Raises a `ValueError` naming the output, the key, its value and what was expected.
    """
    if isinstance(outputs, (str, bytes, Mapping)) or not isinstance(outputs, Sequence) or not outputs:
        raise ValueError(f"autoencoding_outputs ({outputs!r}) must be a non-empty list of dicts")
    inputs = {spec.name: spec for spec in validate_modalities(modalities)}
    known = {"name", "shape", "patch_size", "num_freq_bands", "max_freq", "query_channels", "loss_weight"}
    specs = []
    for out in outputs:
        if not isinstance(out, Mapping):
            raise ValueError(f"each autoencoding output must be a dict, got {out!r}")
        name = out.get("name")
        where = f"autoencoding output {name!r}"
        if name not in inputs:
            raise ValueError(f"{where}: name must be one of the input modalities {list(inputs)}")
        unknown = sorted(set(out) - known)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(known)}")
        source = inputs[name]
        weight = out.get("loss_weight", 1.0)
        if not (_is_positive_number(weight) or weight == 0) or isinstance(weight, bool):
            raise ValueError(f"{where}: loss_weight ({weight!r}) must be a number >= 0")
        if source.one_hot:
            query_channels = out.get("query_channels")
            if not _is_positive_int(query_channels):
                raise ValueError(
                    f"{where}: one-hot outputs need query_channels, a positive integer, got {query_channels!r}"
                )
            extra = sorted(set(out) & {"shape", "patch_size", "num_freq_bands", "max_freq"})
            if extra:
                raise ValueError(f"{where}: one-hot outputs have one learned query; {extra} do not apply")
            specs.append(
                AutoencodingOutputSpec(
                    name=name, query_channels=query_channels, loss_weight=float(weight), channels=source.channels,
                    one_hot=True,
                )
            )  # fmt: skip
            continue
        if source.is_tokens:
            raise ValueError(f"{where}: token modalities cannot be reconstructed (only continuous and one-hot ones)")
        k = source.num_axes
        shape = out.get("shape")
        if not isinstance(shape, Sequence) or len(shape) != k or not all(_is_positive_int(n) for n in shape):
            raise ValueError(f"{where}: shape ({shape!r}) must be a list of {k} positive integers (one per axis)")
        patch = out.get("patch_size", 1)
        patch = (patch,) * k if not isinstance(patch, Sequence) else tuple(patch)
        if len(patch) != k or not all(_is_positive_int(p) for p in patch):
            raise ValueError(
                f"{where}: patch_size ({out.get('patch_size')!r}) must be a positive integer or {k} of them"
            )
        if any(s % p for s, p in zip(shape, patch, strict=True)):
            raise ValueError(
                f"{where}: shape {list(shape)} must be a multiple of patch_size {list(patch)} on each axis"
            )
        bands = out.get("num_freq_bands", source.num_freq_bands)
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 0:
            raise ValueError(f"{where}: num_freq_bands ({bands!r}) must be an integer >= 0")
        max_freq = out.get("max_freq", list(source.max_freqs))
        max_freq = [max_freq] * k if not isinstance(max_freq, Sequence) else list(max_freq)
        if len(max_freq) != k or not all(_is_positive_number(f) for f in max_freq):
            raise ValueError(f"{where}: max_freq ({out.get('max_freq')!r}) must be a positive number or {k} of them")
        specs.append(
            AutoencodingOutputSpec(
                name=name,
                shape=tuple(shape),
                patch_size=patch,
                num_freq_bands=bands,
                max_freq=tuple(float(f) for f in max_freq),
                loss_weight=float(weight),
                channels=source.channels,
            )
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"autoencoding_outputs must name each modality once, got {names}")
    return specs
