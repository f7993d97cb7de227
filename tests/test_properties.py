"""Property-based tests (hypothesis) over configurations and input shapes (issue 8).

Each test draws a configuration or an input, predicts with an oracle written from the documented
semantics (not from the validation code) whether it is valid, then checks: every valid combination
builds and runs and gives outputs of the documented shape; every invalid one raises `ValueError`, never a
`RuntimeError`, `IndexError` or other error from deep inside torch (`pytest.raises(ValueError)` lets any
other exception fail the test). Sizes are tiny (widths <= 12, 1-2 layers) so each example takes
milliseconds; `derandomize=True` makes every run draw the same examples, so CI failures reproduce.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from perceiver_hf import (
    PerceiverAttention,
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverModel,
)

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

HEADS = {"base": PerceiverModel, "mlm": PerceiverForMaskedLM, "clf": PerceiverForSequenceClassification}
INT_FIELDS = (
    "vocab_size", "max_position_embeddings", "d_model", "num_latents", "d_latents", "num_cross_attention_layers",
    "num_self_attention_blocks", "num_self_attention_layers_per_block", "num_cross_attention_heads",
    "num_self_attention_heads", "num_decoder_heads", "num_labels",
)  # fmt: skip
OPTIONAL_INT_FIELDS = (
    "cross_attention_qk_channels", "cross_attention_v_channels", "self_attention_qk_channels",
    "self_attention_v_channels", "decoder_qk_channels", "decoder_v_channels", "d_output_queries",
)  # fmt: skip
# Values that are out of range or of the wrong type for each kind of field.
BAD_VALUES: dict[str, list[Any]] = {
    **{name: [0, -1, 2.5, True, "4"] for name in INT_FIELDS},
    **{name: [0, -3, 1.5] for name in OPTIONAL_INT_FIELDS},
    "dropout": [-0.1, 1.0, 1.5],
    "attention_dropout": [1.0, -0.5],
    "hidden_act": ["relu", "swish"],
    "layer_norm_eps": [0.0, -1e-5],
    "decode_masked_only": ["no", None],
}


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def text_config_is_valid(kwargs: dict[str, Any], head: str) -> bool:
    """The documented constraints: sizes positive; probabilities in [0, 1); a cross-attention layer per block
    at most; every attention width (query-key defaulting to the query width, value to the query-key
    width) divisible by its heads. The decoder's query width is d_model (masked LM) or d_output_queries
    (else d_latents) for classification."""
    if not all(is_positive_int(kwargs[name]) for name in INT_FIELDS):
        return False
    if not all(kwargs[name] is None or is_positive_int(kwargs[name]) for name in OPTIONAL_INT_FIELDS):
        return False
    if not (0 <= kwargs["dropout"] < 1 and 0 <= kwargs["attention_dropout"] < 1 and kwargs["layer_norm_eps"] > 0):
        return False
    if kwargs["hidden_act"] not in ("gelu", "geglu") or not isinstance(kwargs["decode_masked_only"], bool):
        return False
    if kwargs["num_cross_attention_layers"] > kwargs["num_self_attention_blocks"]:
        return False

    def widths_divide(qk: int | None, v: int | None, query_width: int, heads: int) -> bool:
        qk = qk or query_width
        return qk % heads == 0 and (v or qk) % heads == 0

    d_latents = kwargs["d_latents"]
    if not widths_divide(
        kwargs["cross_attention_qk_channels"], kwargs["cross_attention_v_channels"], d_latents,
        kwargs["num_cross_attention_heads"],
    ):  # fmt: skip
        return False
    if not widths_divide(
        kwargs["self_attention_qk_channels"], kwargs["self_attention_v_channels"], d_latents,
        kwargs["num_self_attention_heads"],
    ):  # fmt: skip
        return False
    decoder_heads = kwargs["num_decoder_heads"]
    # Widths given explicitly must divide whatever the head (the config does not know the head).
    for name in ("decoder_qk_channels", "decoder_v_channels"):
        if kwargs[name] is not None and kwargs[name] % decoder_heads:
            return False
    if head != "base":
        query_width = kwargs["d_model"] if head == "mlm" else kwargs["d_output_queries"] or d_latents
        if not widths_divide(kwargs["decoder_qk_channels"], kwargs["decoder_v_channels"], query_width, decoder_heads):
            return False
    return True


@st.composite
def text_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A tiny text configuration, with one field set to an out-of-range or wrongly typed value in about half
    of the draws. Widths are often multiples of the head counts, so that about half the rest is valid."""
    cross_heads, self_heads, decoder_heads = (draw(st.integers(1, 3)) for _ in range(3))

    def width(heads: int) -> st.SearchStrategy[int]:
        return st.integers(1, 4).map(lambda k: k * heads) | st.integers(1, 12)

    def maybe_width(heads: int) -> st.SearchStrategy[int | None]:
        return st.none() | width(heads)

    kwargs: dict[str, Any] = {
        "vocab_size": draw(st.integers(1, 30)),
        "max_position_embeddings": draw(st.integers(1, 8)),
        "d_model": draw(width(decoder_heads)),
        "num_latents": draw(st.integers(1, 4)),
        "d_latents": draw(width(math.lcm(cross_heads, self_heads, decoder_heads))),
        "num_self_attention_blocks": draw(st.integers(1, 2)),
        "num_cross_attention_layers": draw(st.integers(1, 2)),
        "num_self_attention_layers_per_block": draw(st.integers(1, 2)),
        "num_cross_attention_heads": cross_heads,
        "num_self_attention_heads": self_heads,
        "num_decoder_heads": decoder_heads,
        "num_labels": draw(st.integers(1, 3)),
        "cross_attention_qk_channels": draw(maybe_width(cross_heads)),
        "cross_attention_v_channels": draw(maybe_width(cross_heads)),
        "self_attention_qk_channels": draw(maybe_width(self_heads)),
        "self_attention_v_channels": draw(maybe_width(self_heads)),
        "decoder_qk_channels": draw(maybe_width(decoder_heads)),
        "decoder_v_channels": draw(maybe_width(decoder_heads)),
        "d_output_queries": draw(maybe_width(decoder_heads)),
        "first_cross_attention_layer_shared": draw(st.booleans()),
        "first_self_attention_block_shared": draw(st.booleans()),
        "hidden_act": draw(st.sampled_from(["gelu", "geglu"])),
        "dropout": draw(st.sampled_from([0.0, 0.2])),
        "attention_dropout": draw(st.sampled_from([0.0, 0.1])),
        "layer_norm_eps": 1e-5,
        "decode_masked_only": draw(st.booleans()),
        "attn_implementation": draw(st.sampled_from(["sdpa", "eager"])),
    }
    if draw(st.booleans()):
        broken = draw(st.sampled_from(sorted(BAD_VALUES)))
        kwargs[broken] = draw(st.sampled_from(BAD_VALUES[broken]))
    return kwargs


def build_and_run_text_model(kwargs: dict[str, Any], head: str) -> None:
    kwargs = dict(kwargs)
    attn_implementation = kwargs.pop("attn_implementation")
    config = PerceiverConfig(input_adapter="text", **kwargs)
    config._attn_implementation = attn_implementation
    model = HEADS[head](config)
    batch, seq = 2, min(3, config.max_position_embeddings)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 1:] = 0  # padding
    model.eval()
    outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    if head == "base":
        assert outputs.last_hidden_state.shape == (batch, config.num_latents, config.d_latents)
    elif head == "mlm":
        assert outputs.logits.shape == (batch, seq, config.vocab_size)
        model.train()  # the decode-masked-only training path with a loss
        labels = torch.full_like(input_ids, -100)
        labels[:, 0] = input_ids[:, 0]
        assert torch.isfinite(model(input_ids=input_ids, labels=labels).loss)
    else:
        assert outputs.logits.shape == (batch, config.num_labels)
        labels = torch.randint(0, config.num_labels, (batch,))
        assert torch.isfinite(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


@settings(max_examples=60, **SETTINGS)
@given(kwargs=text_configs(), head=st.sampled_from(list(HEADS)))
def test_text_configurations_run_or_raise_value_error(kwargs: dict[str, Any], head: str) -> None:
    valid = text_config_is_valid(kwargs, head)
    event("valid" if valid else "invalid")  # shown by --hypothesis-show-statistics
    if valid:
        build_and_run_text_model(kwargs, head)
    else:
        with pytest.raises(ValueError):
            build_and_run_text_model(kwargs, head)


@settings(max_examples=20, **SETTINGS)
@given(
    heads=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    multiples=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    head=st.sampled_from(list(HEADS)),
    layers=st.integers(1, 2),
)
def test_text_configurations_valid_by_construction_always_run(
    heads: tuple[int, int, int], multiples: tuple[int, int], head: str, layers: int
) -> None:
    """Widths built as multiples of every head count: each such configuration must run (the oracle above
    could be too strict; this one cannot)."""
    cross, self_, decoder = heads
    lcm = math.lcm(cross, self_, decoder)
    kwargs = {
        "vocab_size": 17, "max_position_embeddings": 6, "d_model": decoder * multiples[0], "num_latents": 3,
        "d_latents": lcm * multiples[1], "num_self_attention_blocks": layers, "num_cross_attention_layers": layers,
        "num_self_attention_layers_per_block": 1, "num_cross_attention_heads": cross,
        "num_self_attention_heads": self_, "num_decoder_heads": decoder, "num_labels": 2,
        **dict.fromkeys(OPTIONAL_INT_FIELDS), "first_cross_attention_layer_shared": False,
        "first_self_attention_block_shared": True, "hidden_act": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
        "layer_norm_eps": 1e-5, "decode_masked_only": True, "attn_implementation": "sdpa",
    }  # fmt: skip
    assert text_config_is_valid(kwargs, head)
    build_and_run_text_model(kwargs, head)


# A fixed tiny model per text head for the input-shape properties.
TEXT_CONFIG = PerceiverConfig(
    vocab_size=23, max_position_embeddings=6, d_model=8, num_latents=3, d_latents=8, num_cross_attention_heads=2,
    num_self_attention_heads=2, num_self_attention_layers_per_block=1, num_decoder_heads=2, num_labels=3,
)  # fmt: skip
TEXT_MODELS = {name: cls(TEXT_CONFIG).eval() for name, cls in HEADS.items()}
ID_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]


TEXT_FAULTS = ("dtype", "ids", "mask", "labels", "batch", "length")


@settings(max_examples=150, **SETTINGS)
@given(
    head=st.sampled_from(list(HEADS)),
    training=st.booleans(),
    faults=st.sets(st.sampled_from(TEXT_FAULTS), max_size=2),
    data=st.data(),
)
def test_text_inputs_run_or_raise_value_error(head: str, training: bool, faults: set[str], data: st.DataObject) -> None:
    """Inputs with up to two faults (wrong dtype, ids outside the vocabulary, a bad mask or labels, an empty
    batch, an empty or too long sequence). Validity is judged from the drawn values, not from the fault names:
    the classifier, for instance, cuts long inputs instead of refusing them."""
    config, model = TEXT_CONFIG, TEXT_MODELS[head]
    max_len = config.max_position_embeddings
    model.train(training)
    draw = data.draw
    dtype = draw(st.sampled_from(ID_DTYPES[2:] if "dtype" in faults else ID_DTYPES[:2]), label="dtype")
    batch = 0 if "batch" in faults else draw(st.integers(1, 3), label="batch")
    seq = draw(st.sampled_from([0, max_len + 1, max_len + 2]) if "length" in faults else st.integers(1, max_len))
    ids = draw(st.sampled_from(["too large", "negative"]) if "ids" in faults else st.just("in range"), label="ids")
    mask = draw(
        st.sampled_from(["empty row", "too short"]) if "mask" in faults else st.sampled_from([None, "ones", "padded"]),
        label="mask",
    )
    labels = draw(st.just("out of range") if "labels" in faults else st.sampled_from([None, "valid"]), label="labels")

    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    if ids != "in range" and input_ids.numel():
        input_ids[0, 0] = config.vocab_size if ids == "too large" else -1
    mask_len = seq - 1 if mask == "too short" else seq
    attention_mask = None if mask is None else torch.ones(batch, max(mask_len, 0), dtype=torch.long)
    if mask == "padded" and seq > 1:
        attention_mask[:, -1] = 0
    if mask == "empty row" and batch:
        attention_mask[-1] = 0
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(dtype), "attention_mask": attention_mask}
    if labels is not None and head == "mlm":
        kwargs["labels"] = torch.where(torch.rand(batch, seq) < 0.5, input_ids.clamp(0, config.vocab_size - 1), -100)
        if labels == "out of range" and input_ids.numel():
            kwargs["labels"][0, 0] = config.vocab_size + 5
    if labels is not None and head == "clf":
        kwargs["labels"] = torch.randint(0, config.num_labels, (batch,))
        if labels == "out of range" and batch:
            kwargs["labels"][0] = config.num_labels

    # The classifier cuts inputs (and masks) to max_position_embeddings; the other heads refuse them.
    seq_seen = min(seq, max_len) if head == "clf" else seq
    mask_seen = min(mask_len, max_len) if head == "clf" else mask_len
    out_of_range = (ids != "in range" and input_ids.numel() > 0) or (
        labels == "out of range" and head != "base" and input_ids.numel() > 0
    )
    valid = (
        dtype in (torch.int64, torch.int32)
        and batch >= 1
        and 1 <= seq_seen <= max_len
        and not out_of_range
        and (mask is None or (mask_seen == seq_seen and mask != "empty row"))
    )
    event("valid" if valid else "invalid")
    if not valid:
        with pytest.raises(ValueError):
            model(**kwargs)
        return
    outputs = model(**kwargs)
    if head == "base":
        assert outputs.last_hidden_state.shape == (batch, config.num_latents, config.d_latents)
    elif head == "clf":
        assert outputs.logits.shape == (batch, config.num_labels)
    elif not (training and "labels" in kwargs and config.decode_masked_only):
        assert outputs.logits.shape == (batch, seq, config.vocab_size)
    if "labels" in kwargs:
        assert outputs.loss is not None and not torch.isinf(outputs.loss)


def conv_output_size(size: int, num_layers: int) -> int:
    for _ in range(num_layers):
        size = math.ceil(math.ceil(size / 2) / 2)
    return size


@settings(max_examples=120, **SETTINGS)
@given(
    image_size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    num_channels=st.integers(1, 3),
    preprocessing=st.sampled_from(["pixels", "patches", "conv"]),
    spatial_downsample=st.sampled_from([None, None, 1, 2, 4, 16]),
    position_encoding=st.sampled_from(["fourier", "learned"]),
    projection=st.sampled_from([None, 4]),
    data=st.data(),
)
def test_image_configurations_and_inputs_run_or_raise_value_error(
    image_size: tuple[int, int],
    num_channels: int,
    preprocessing: str,
    spatial_downsample: int | None,
    position_encoding: str,
    projection: int | None,
    data: st.DataObject,
) -> None:
    config_kwargs = dict(
        input_adapter="image", image_size=list(image_size), num_channels=num_channels, num_frequency_bands=2,
        image_preprocessing=preprocessing, spatial_downsample=spatial_downsample,
        image_position_encoding=position_encoding, image_projection_channels=projection, num_latents=3, d_latents=8,
        num_cross_attention_heads=1, num_self_attention_heads=2, num_self_attention_layers_per_block=1,
        num_decoder_heads=1, num_labels=4,
    )  # fmt: skip
    s = spatial_downsample or (1 if preprocessing == "pixels" else 4)
    if preprocessing == "conv":  # each conv + max-pool layer downsamples 4x
        config_valid = s >= 4 and 4 ** round(math.log(s, 4)) == s
    elif preprocessing == "patches":
        config_valid = image_size[0] % s == 0 and image_size[1] % s == 0
    else:
        config_valid = True
    if not config_valid:
        event("invalid config")
        with pytest.raises(ValueError):
            PerceiverForImageClassification(PerceiverConfig(**config_kwargs))
        return
    model = PerceiverForImageClassification(PerceiverConfig(**config_kwargs)).eval()

    # Inputs with up to two faults; the size is the configured one or any (including empty).
    draw = data.draw
    faults = draw(st.sets(st.sampled_from(["batch", "layout", "channels", "dtype"]), max_size=2), label="faults")
    batch = 0 if "batch" in faults else draw(st.integers(1, 2), label="batch")
    layout = "3-d" if "layout" in faults else draw(st.sampled_from(["channels_last", "channels_first"]))
    channels = num_channels % 3 + 1 if "channels" in faults else num_channels
    h, w = draw(st.just(image_size) | st.tuples(st.integers(0, 7), st.integers(0, 7)), label="size")
    dtype = draw(st.sampled_from([torch.uint8, torch.int64] if "dtype" in faults else [torch.float32, torch.float64]))
    shape = {
        "channels_last": (batch, h, w, channels),
        "channels_first": (batch, channels, h, w),
        "3-d": (channels, h, w),
    }[layout]
    pixel_values = (torch.rand(shape) * 255).to(dtype)

    # Which (height, width) the model reads: a trailing channel axis wins, then a leading one.
    if len(shape) != 4:
        seen = None
    elif shape[-1] == num_channels:
        seen = shape[1], shape[2]
    elif shape[1] == num_channels:
        seen = shape[2], shape[3]
    else:
        seen = None
    valid = seen is not None and dtype.is_floating_point and batch >= 1 and min(seen) >= 1
    if valid and preprocessing == "patches":
        valid = seen[0] % s == 0 and seen[1] % s == 0
    if valid and position_encoding == "learned":  # learned positions fix the grid to the configured size
        if preprocessing == "conv":
            layers = round(math.log(s, 4))
            valid = all(
                conv_output_size(a, layers) == conv_output_size(b, layers)
                for a, b in zip(seen, image_size, strict=True)
            )
        else:
            valid = all(math.ceil(a / s) == math.ceil(b / s) for a, b in zip(seen, image_size, strict=True))
    event("valid input" if valid else "invalid input")
    if not valid:
        with pytest.raises(ValueError):
            model(pixel_values=pixel_values)
        return
    logits = model(pixel_values=pixel_values).logits
    assert logits.shape == (batch, 4) and logits.dtype == model.dtype and torch.isfinite(logits).all()


@settings(max_examples=80, **SETTINGS)
@given(
    num_heads=st.sampled_from([1, 2, 2, 4, 0, -1]),
    q_channels=st.sampled_from([4, 8, 6, 0]),
    kv_channels=st.integers(1, 8),
    qk_channels=st.sampled_from([None, None, 4, 8, 6]),
    v_channels=st.sampled_from([None, None, 4, 8, 3]),
    implementation=st.sampled_from(["sdpa", "eager"]),
    data=st.data(),
)
def test_attention_runs_or_raises_value_error(
    num_heads: int,
    q_channels: int,
    kv_channels: int,
    qk_channels: int | None,
    v_channels: int | None,
    implementation: str,
    data: st.DataObject,
) -> None:
    def build() -> PerceiverAttention:
        config = PerceiverConfig(input_adapter="none", attn_implementation=implementation)
        return PerceiverAttention(config, num_heads, q_channels, kv_channels, qk_channels, v_channels)

    qk = qk_channels or q_channels  # the documented defaults: query width, then query-key width
    v = v_channels or qk
    if not (num_heads >= 1 and q_channels >= 1 and qk % num_heads == 0 and v % num_heads == 0):
        event("invalid module")
        with pytest.raises(ValueError):
            build()
        return
    attention = build()

    draw = data.draw
    faults = draw(st.sets(st.sampled_from(["kv batch", "no keys", "q width", "kv width", "2-d"]), max_size=2))
    batch = draw(st.integers(1, 2), label="batch")
    kv_batch = batch + 1 if "kv batch" in faults else batch
    num_queries, num_keys = draw(st.integers(1, 3), label="queries"), 0 if "no keys" in faults else 3
    q_width = q_channels + 1 if "q width" in faults else q_channels
    kv_width = kv_channels + 1 if "kv width" in faults else kv_channels
    rank_2_queries = "2-d" in faults
    x_q = torch.randn((num_queries, q_width) if rank_2_queries else (batch, num_queries, q_width))
    x_kv = torch.randn(kv_batch, num_keys, kv_width)
    valid = (
        not rank_2_queries and q_width == q_channels and kv_width == kv_channels and kv_batch == batch and num_keys >= 1
    )
    event("valid input" if valid else "invalid input")
    if not valid:
        with pytest.raises(ValueError):
            attention(x_q, x_kv)
        return
    output, weights = attention(x_q, x_kv, output_attentions=True)
    assert output.shape == (batch, num_queries, q_channels)
    assert weights.shape == (batch, num_heads, num_queries, num_keys)
