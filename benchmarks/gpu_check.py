"""Prepared GPU check (issue 14): a bf16 and an fp16 mixed-precision training step of every head, on one GPU.

    bash benchmarks/gpu_check.sh --output "$OUT/gpu_check.json"    # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --device cpu --tiny             # CPU smoke run (tests/test_gpu_check.py)

For every head of the package, at a realistic mid-sized config (`CASES`; the bare encoders `PerceiverModel` and
`PerceiverARModel` have no loss and are not heads), it trains:

- under bf16 autocast: warm-up steps, then timed steps (forward, loss, backward, fused AdamW step; weights,
  gradients and optimizer state in fp32), timed between `torch.cuda.synchronize()` calls. Two more untimed steps
  run before the timed ones: one under `torch.profiler`, which records the `aten::_scaled_dot_product_*` op that
  each attention call dispatched to (flash, efficient, cudnn or math: the backend PyTorch chose, not a guess from
  the shapes; the attention kernels' names are kept as evidence), and one under `FlopCounterMode`, which counts the
  step's FLOPs (with autograd on: its module tracker fails under `no_grad` / `inference_mode` in torch 2.13).
  Model FLOP utilisation is the step's FLOP rate over the device's dense bf16 peak (`--peak-tflops`, by default
  from `PEAK_BF16_TFLOPS` by device name) and over the rate of a large bf16 matmul measured in the same run;
- under fp16 autocast with loss scaling (`torch.amp.GradScaler`): the same step, its throughput, whether the
  losses stayed finite, and how many steps the scaler skipped because the gradients overflowed.

It prints a Markdown table and writes everything as JSON (`--output`) after every head, so that a run cut short
keeps what it measured. Time is bounded: each head has a budget (`--head-budget-s`; bf16 gets 60% of it), a phase
stops its timed steps when its share is spent, and a head is skipped, with a note, when less than a quarter of a
head budget is left of the whole run's (`--budget-s`). The defaults end well inside 10 minutes on an H200.
Nothing is downloaded: models are built from configs and the inputs are random.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # the repository: perceiver_hf need not be installed on the GPU machine
sys.path.insert(0, str(BENCHMARKS))  # common.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no internet; nothing here needs the Hub

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s. The first name contained in the
# device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# The SDPA op each backend is dispatched as (forward only: the backward ops are named `..._backward`).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
# The softmax of attention computed as matmuls: "eager", and "sdpa" on CPU in half precision over few keys
# (`perceiver_hf.modeling_perceiver.sdpa_prefers_matmul`); the heads' losses use log_softmax, not this op. SDPA's
# math backend calls it too, inside its own op: only a softmax outside every SDPA op counts as the matmul path.
EAGER_ATTENTION_OP = "aten::softmax"
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "sdpa", "attn")

MASK_TOKEN_ID = 4  # as benchmarks/common.py: ids 0-4 are the special tokens of the WordPiece vocabulary
MASKING_PROBABILITY = 0.15


# ---------------------------------------------------------------------------------------------------- the heads


@dataclass
class Workload:
    """A head's config and random batches for it.

    Attributes:
        config: the model's config.
        batch_size: examples per step.
        positions: the encoder's input positions per example (tokens, pixels, audio patches, ...): the "tokens" of
            the tokens-per-second column.
        description: the input, in words.
        make_batch: `(batch_size, generator) -> keyword arguments of the model`, `labels` included.
    """

    config: Any
    batch_size: int
    positions: int
    description: str
    make_batch: Callable[[int, torch.Generator], dict[str, Any]]


def encoder(tiny: bool) -> dict[str, int]:
    """The encoder of issue 14's masked-LM step: 256 x 512 latents, one cross-attention and 6 self-attention layers,
    8 heads in both (64 channels per head). Decoders keep each head's defaults."""
    if tiny:
        return dict(num_latents=8, d_latents=32, num_self_attention_layers_per_block=2, num_cross_attention_heads=2,
                    num_self_attention_heads=2)  # fmt: skip
    return dict(num_latents=256, d_latents=512, num_self_attention_layers_per_block=6, num_cross_attention_heads=8,
                num_self_attention_heads=8)  # fmt: skip


def masked_lm(tiny: bool) -> Workload:
    """Issue 14's workload: 512 tokens, vocabulary 10,003, 15% of the tokens masked (only those are decoded)."""
    from perceiver_hf import PerceiverConfig

    seq_len, vocab_size, d_model = (32, 101, 32) if tiny else (512, 10_003, 512)
    config = PerceiverConfig(input_adapter="text", vocab_size=vocab_size, max_position_embeddings=seq_len,
                             d_model=d_model, num_decoder_heads=2 if tiny else 8, **encoder(tiny))  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
        masked = torch.rand(batch_size, seq_len, generator=generator) < MASKING_PROBABILITY
        masked[:, 0] = True  # every row has a label
        labels = torch.where(masked, input_ids, -100)
        return {"input_ids": input_ids.masked_fill(masked, MASK_TOKEN_ID), "labels": labels}

    return Workload(config, 2 if tiny else 64, seq_len, f"{seq_len} tokens, 15% masked", make_batch)


def sequence_classification(tiny: bool) -> Workload:
    """IMDb-like: up to 512 tokens, padded (lengths 256-512), so the attention takes a padding mask."""
    from perceiver_hf import PerceiverConfig

    seq_len, vocab_size, d_model = (32, 101, 32) if tiny else (512, 10_003, 512)
    config = PerceiverConfig(input_adapter="text", vocab_size=vocab_size, max_position_embeddings=seq_len,
                             d_model=d_model, num_labels=2, pad_token_id=0, **encoder(tiny))  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
        attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator) * attention_mask
        labels = torch.randint(0, 2, (batch_size,), generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return Workload(config, 2 if tiny else 64, seq_len, f"{seq_len} tokens, padded from {seq_len // 2}", make_batch)


def image_classification(tiny: bool) -> Workload:
    """ImageNet-like: 224 x 224 x 3 pixels with 64 Fourier bands (50,176 positions), 1,000 classes."""
    from perceiver_hf import PerceiverConfig

    size, bands, num_labels = (16, 4, 10) if tiny else (224, 64, 1000)
    config = PerceiverConfig(input_adapter="image", image_size=[size, size], num_channels=3, num_frequency_bands=bands,
                             num_labels=num_labels, **encoder(tiny))  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),  # (B, C, H, W)
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }

    return Workload(config, 2 if tiny else 32, size * size, f"{size}x{size}x3 image", make_batch)


def audio_classification(tiny: bool) -> Workload:
    """AudioSet-like: 10 s of 16 kHz audio in 16-sample patches (10,000 positions), 527 classes."""
    from perceiver_hf import PerceiverConfig

    samples, patch, bands, num_labels = (256, 4, 4, 10) if tiny else (160_000, 16, 64, 527)
    config = PerceiverConfig(input_adapter="audio", max_audio_samples=samples, audio_patch_size=patch,
                             num_frequency_bands=bands, num_labels=num_labels, **encoder(tiny))  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return {
            "input_values": 0.1 * torch.randn(batch_size, samples, generator=generator),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }

    description = f"{samples:,} audio samples in {patch}-sample patches"
    return Workload(config, 2 if tiny else 32, samples // patch, description, make_batch)


def multimodal_classification(tiny: bool) -> Workload:
    """An image (128 x 128 x 3, 16,384 positions) and 1 s of 16 kHz audio (1,000 patches of 16), 10 classes."""
    from perceiver_hf import PerceiverConfig

    size, samples, patch, bands = (8, 64, 4, 2) if tiny else (128, 16_000, 16, 32)
    modalities = [
        {"name": "image", "channels": 3, "num_axes": 2, "num_freq_bands": bands, "max_freq": float(size)},
        {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": bands, "max_freq": float(samples // patch),
         "max_length": samples, "patch_size": patch},
    ]  # fmt: skip
    config = PerceiverConfig(input_adapter="multimodal", modalities=modalities, num_labels=10, **encoder(tiny))

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        inputs = {
            "image": torch.randn(batch_size, 3, size, size, generator=generator),  # (B, C, H, W)
            "audio": 0.1 * torch.randn(batch_size, samples, generator=generator),
        }
        return {"inputs": inputs, "labels": torch.randint(0, 10, (batch_size,), generator=generator)}

    description = f"{size}x{size}x3 image + {samples:,} audio samples"
    return Workload(config, 2 if tiny else 32, size * size + samples // patch, description, make_batch)


def optical_flow(tiny: bool) -> Workload:
    """DeepMind's training crop: frame pairs of 368 x 496 pixels (182,528 positions, each decoded), 64 bands."""
    from perceiver_hf import PerceiverConfig

    height, width, bands, projection = (12, 16, 4, 16) if tiny else (368, 496, 64, 64)
    config = PerceiverConfig(input_adapter="flow", flow_image_size=[height, width], num_frequency_bands=bands,
                             flow_projection_channels=projection, **encoder(tiny))  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return {
            "pixel_values": torch.randn(batch_size, 2, 3, height, width, generator=generator),  # (B, 2, C, H, W)
            "labels": 5 * torch.randn(batch_size, height, width, 2, generator=generator),  # flow in pixels
        }

    return Workload(config, 2 if tiny else 8, height * width, f"{height}x{width} frame pair", make_batch)


def multimodal_autoencoding(tiny: bool) -> Workload:
    """Kinetics-like, smaller than DeepMind's: 8 frames of 112 x 112 x 3 in 1x4x4 patches, 15,360 audio samples in
    16-sample patches, a 700-class label; all three reconstructed (6,272 + 960 + 1 decoder queries)."""
    from perceiver_hf import PerceiverConfig

    frames, size, samples, classes = (2, 8, 32, 5) if tiny else (8, 112, 15_360, 700)
    video_patch, audio_patch, bands = ([1, 2, 2], 4, 2) if tiny else ([1, 4, 4], 16, 32)
    modalities = [
        {"name": "image", "channels": 3, "num_axes": 3, "num_freq_bands": bands, "max_freq": [frames, size, size],
         "patch_size": video_patch},
        {"name": "audio", "channels": 1, "num_axes": 1, "num_freq_bands": bands,
         "max_freq": float(samples // audio_patch), "max_length": samples, "patch_size": audio_patch},
        {"name": "label", "channels": classes, "num_axes": 1, "num_freq_bands": 0, "max_freq": 1.0, "one_hot": True,
         "mask_token": True},
    ]  # fmt: skip
    outputs = [
        {"name": "image", "shape": [frames, size, size], "patch_size": video_patch},
        {"name": "audio", "shape": [samples], "patch_size": audio_patch},
        {"name": "label", "query_channels": 16 if tiny else 1024},
    ]
    config = PerceiverConfig(input_adapter="multimodal", modalities=modalities, modality_encoding="concat",
                             modality_padding=2 if tiny else 4, autoencoding_outputs=outputs,
                             autoencoding_output_channels=32 if tiny else 512, **encoder(tiny))  # fmt: skip
    video_positions = frames * (size // video_patch[1]) * (size // video_patch[2])

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        inputs = {
            "image": torch.rand(batch_size, frames, size, size, 3, generator=generator),  # (B, T, H, W, C)
            "audio": 0.1 * torch.randn(batch_size, samples, generator=generator),
            "label": torch.randint(0, classes, (batch_size,), generator=generator),
        }
        return {"inputs": inputs, "labels": inputs}  # an autoencoder: the targets are the inputs

    description = f"{frames}x{size}x{size}x3 video + {samples:,} audio samples + label"
    positions = video_positions + samples // audio_patch + 1
    return Workload(config, 2 if tiny else 16, positions, description, make_batch)


def causal_lm(tiny: bool) -> Workload:
    """Perceiver AR as in benchmarks/perceiver_ar.py: a 4,096-byte context, 512 latents (each predicting the next
    token), 6 self-attention layers, prefix dropout 0.5. "Tokens" are the context's."""
    from perceiver_hf import PerceiverARConfig

    context, latents, hidden, layers, heads = (64, 16, 32, 2, 2) if tiny else (4096, 512, 512, 6, 8)
    config = PerceiverARConfig(vocab_size=262, max_position_embeddings=context, num_latents=latents,
                               hidden_size=hidden, num_self_attention_layers=layers, num_cross_attention_heads=heads,
                               num_self_attention_heads=heads)  # fmt: skip

    def make_batch(batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        input_ids = torch.randint(0, 262, (batch_size, context), generator=generator)
        return {"input_ids": input_ids, "labels": input_ids}

    return Workload(config, 2 if tiny else 32, context, f"{context:,}-token context, {latents} latents", make_batch)


# (head class name, workload): every head the package exports (tests/test_gpu_check.py checks that none is missing).
CASES: list[tuple[str, Callable[[bool], Workload]]] = [
    ("PerceiverForMaskedLM", masked_lm),
    ("PerceiverForSequenceClassification", sequence_classification),
    ("PerceiverForImageClassification", image_classification),
    ("PerceiverForAudioClassification", audio_classification),
    ("PerceiverForMultimodalClassification", multimodal_classification),
    ("PerceiverForOpticalFlow", optical_flow),
    ("PerceiverForMultimodalAutoencoding", multimodal_autoencoding),
    ("PerceiverARForCausalLM", causal_lm),
]


# ---------------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value.to(device)


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def matmul_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    """The best TFLOP/s of a `size` x `size` bf16 matmul (bf16 in and out: the GEMMs that bf16 autocast runs)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def make_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """Fused AdamW (one kernel for all parameters), or the default implementation where fused is not available."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(parameters, lr=1e-4, fused=True), "AdamW (fused)"
    except (RuntimeError, ValueError) as error:
        return torch.optim.AdamW(parameters, lr=1e-4), f"AdamW (not fused: {error_text(error)})"


def training_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None,
) -> Callable[[], torch.Tensor]:
    """One optimizer step with the forward pass and loss under autocast, the backward outside (as Accelerate and the
    Trainer do). Returns the loss as a tensor, so that a step does not wait for the GPU."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skipped (and the scale halved) when a gradient is inf or NaN
            scaler.update()
        return loss.detach()

    return step


def _inside_sdpa(event) -> bool:
    """Whether a profiler event ran inside an SDPA op (the math backend's own softmax, for instance)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in SDPA_OPS or parent.name == "aten::scaled_dot_product_attention":
            return True
        parent = parent.cpu_parent
    return False


def sdpa_backends(step: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Which SDPA backend (or the matmul path) each attention call of one step ran, from the aten ops the profiler
    recorded."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    calls: Counter[str] = Counter()
    kernels: set[str] = set()
    for event in profiler.events():
        if event.name in SDPA_OPS:
            calls[SDPA_OPS[event.name]] += 1
        elif event.name == EAGER_ATTENTION_OP and not _inside_sdpa(event):
            calls["matmul + softmax"] += 1
        elif event.device_type == DeviceType.CUDA and any(w in event.name.lower() for w in ATTENTION_KERNEL_WORDS):
            kernels.add(event.name[:160])
    return {
        "backends": dict(calls),  # forward calls per backend, in one step
        "kernels": sorted(kernels)[:8],
        "method": "torch.profiler: the aten::_scaled_dot_product_* op (or aten::softmax of the matmul path) of each "
        "forward attention call in one step",
    }


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run_phase(
    precision: str,
    model: torch.nn.Module,
    batch: dict[str, Any],
    workload: Workload,
    device: torch.device,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    """Warm-up and timed training steps in `precision` ("bf16", or "fp16" with loss scaling); the bf16 phase also
    finds the SDPA backends and counts the FLOPs. Stops its steps at `deadline` (after at least one timed step)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    optimizer, optimizer_name = make_optimizer(model)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    initial_scale = scaler.get_scale() if scaler is not None else None
    step = training_step(model, batch, optimizer, device, dtype, scaler)
    result: dict[str, Any] = {"optimizer": optimizer_name}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    warmup = 0
    for _ in range(args.warmup):
        step()  # the first steps also allocate the optimizer state, and pick and load kernels
        warmup += 1
        if time.perf_counter() > deadline:
            break
    synchronize(device)
    if precision == "bf16":
        # Both are diagnostics (the profiler needs CUPTI on a GPU): a failure is reported, and the timing still runs.
        try:
            result["sdpa"] = sdpa_backends(step, device)
        except Exception as error:
            result["sdpa"] = {"backends": {}, "error": error_text(error)}
        try:
            result["flops_per_step"] = count_flops(step)
        except Exception as error:
            result["flops_error"] = error_text(error)

    iterations = args.iters if precision == "bf16" else args.fp16_iters
    losses = []
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        losses.append(step())
        if time.perf_counter() > deadline:
            break
    synchronize(device)
    seconds = (time.perf_counter() - start) / len(losses)

    losses = torch.stack(losses).float().cpu()
    result |= {
        "warmup_steps": warmup,
        "timed_steps": len(losses),
        "cut_by_budget": len(losses) < iterations,
        "step_s": seconds,
        "samples_per_s": workload.batch_size / seconds,
        "tokens_per_s": workload.batch_size * workload.positions / seconds,
        "loss_first": losses[0].item(),
        "loss_last": losses[-1].item(),
        "losses_finite": bool(torch.isfinite(losses).all()),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
    if scaler is not None:
        # Every skipped step halves the scale, and it only grows after 2,000 good steps in a row (`growth_interval`),
        # so with fewer steps the skips are read from the scale without a per-step sync.
        final_scale = scaler.get_scale()
        counted = warmup + len(losses) < scaler.get_growth_interval()
        skipped = round(math.log2(initial_scale / final_scale)) if counted else None
        result |= {"loss_scale": final_scale, "skipped_steps": skipped}
    return result


def add_rates(phase: dict[str, Any], flops: int | None, peak_tflops: float | None, matmul: float) -> None:
    """FLOP rate and utilisation of a measured phase, from the bf16 step's FLOP count (fp16 runs the same FLOPs)."""
    if not flops or "step_s" not in phase:
        return
    tflops = flops / phase["step_s"] / 1e12
    phase["tflops_per_s"] = tflops
    phase["mfu_peak"] = tflops / peak_tflops if peak_tflops else None
    phase["mfu_matmul"] = tflops / matmul if matmul else None


def run_case(
    name: str,
    make: Callable[[bool], Workload],
    device: torch.device,
    args: argparse.Namespace,
    run_deadline: float,
    peak_tflops: float | None,
    matmul: float,
) -> dict[str, Any]:
    """Build one head and run its bf16 and fp16 phases within its time budget."""
    import perceiver_hf  # imported (and timed) once by main()

    start = time.perf_counter()
    deadline = min(start + args.head_budget_s, run_deadline)
    row: dict[str, Any] = {"head": name}
    try:
        workload = make(args.tiny)
        torch.manual_seed(0)
        model = getattr(perceiver_hf, name)(workload.config).to(device).train()
        batch = to_device(workload.make_batch(workload.batch_size, torch.Generator().manual_seed(0)), device)
    except Exception as error:
        return row | {"status": "error", "note": f"build: {error_text(error)}"}
    row |= {
        "input": workload.description,
        "batch_size": workload.batch_size,
        "tokens_per_example": workload.positions,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": workload.config.to_diff_dict(),
    }
    notes = []
    for precision, phase_deadline in (("bf16", start + 0.6 * (deadline - start)), ("fp16", deadline)):
        try:
            row[precision] = run_phase(precision, model, batch, workload, device, args, phase_deadline)
        except Exception as error:  # out of memory, a kernel without fp16 support, ...: reported, the next phase runs
            row[precision] = {"error": error_text(error)}
            notes.append(f"{precision}: {error_text(error)}")
            model.zero_grad(set_to_none=True)  # the failed step's gradients
        if row[precision].get("cut_by_budget"):
            notes.append(f"{precision}: {row[precision]['timed_steps']} timed steps (time budget)")
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    flops = row["bf16"].get("flops_per_step")
    for precision in ("bf16", "fp16"):
        add_rates(row[precision], flops, peak_tflops, matmul)
    finite = all(row[p].get("losses_finite") for p in ("bf16", "fp16"))
    if "error" not in row["bf16"] and "error" not in row["fp16"] and not finite:
        notes.append("non-finite loss")
    row["status"] = "ok" if finite else "error"
    row["note"] = "; ".join(notes)
    row["seconds"] = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------------------------- report


def processor_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "device": str(device),
        "processor": processor_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gb": properties.total_memory / 1e9,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "sdpa_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        }
    else:
        info["device_name"] = info["processor"]
    return info


def default_peak(device_name: str) -> tuple[float | None, str]:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops, f"data sheet ({name}, dense bf16)"
    return None, f"unknown for {device_name!r}: pass --peak-tflops"


def fmt(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale if scale != 1.0 else value, spec)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}); processor: {env['processor']}; torch {env['torch']} "
        f"(CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}); transformers {env['transformers']}",
        f"bf16 peak: {fmt(report['peak_bf16_tflops'], '.0f')} TFLOP/s ({report['peak_source']}); measured "
        f"{report['matmul_size']}x{report['matmul_size']} bf16 matmul: {report['matmul_bf16_tflops']:.1f} TFLOP/s",
        "",
        "| head | batch x input | params (M) | SDPA backend (bf16 step) | bf16 ms/step | samples/s | tokens/s | "
        "TFLOP/step | TFLOP/s | MFU (peak) | MFU (matmul) | bf16 loss | fp16 ms/step | fp16 tokens/s | fp16 loss | "
        "fp16 skipped steps | peak GB | note |",
        "|---" * 18 + "|",
    ]
    for row in report["rows"]:
        bf16, fp16 = row.get("bf16", {}), row.get("fp16", {})
        backends = ", ".join(f"{k} x{v}" for k, v in bf16.get("sdpa", {}).get("backends", {}).items()) or "-"
        batch = f"{row['batch_size']} x {row['input']}" if "input" in row else "-"
        params = fmt(row.get("parameters"), ".3g", 1e-6)
        peak_memory = max((p["peak_memory_gb"] for p in (bf16, fp16) if p.get("peak_memory_gb")), default=None)
        cells = [
            row["head"], batch, params, backends,
            fmt(bf16.get("step_s"), ".1f", 1e3), fmt(bf16.get("samples_per_s"), ",.0f"),
            fmt(bf16.get("tokens_per_s"), ",.0f"), fmt(bf16.get("flops_per_step"), ".3g", 1e-12),
            fmt(bf16.get("tflops_per_s"), ".3g"), fmt(bf16.get("mfu_peak"), ".1%"), fmt(bf16.get("mfu_matmul"), ".1%"),
            fmt(bf16.get("loss_last"), ".4g"), fmt(fp16.get("step_s"), ".1f", 1e3),
            fmt(fp16.get("tokens_per_s"), ",.0f"), fmt(fp16.get("loss_last"), ".4g"),
            fmt(fp16.get("skipped_steps"), "d"), fmt(peak_memory, ".1f"), row.get("note", "") or row["status"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += [
        "",
        "tokens/s: the encoder's input positions per second (text and Perceiver AR: tokens; images and flow: pixels; "
        "audio: patches; multimodal: all modalities' positions). TFLOP/step: forward + backward, counted by "
        "FlopCounterMode on one bf16 step (fp16 runs the same). MFU: TFLOP/s over the bf16 peak, and over the measured "
        "matmul rate. SDPA backend: forward attention calls per backend in one step, as dispatched (torch.profiler; "
        "'matmul + softmax': attention run as matmuls).",
    ]
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as strings ("nan", "inf"): JSON has no NaN (`losses_finite` flags them)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(report), indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and 1-2 steps: a smoke run for the CPU")
    parser.add_argument("--output", type=Path, help="JSON report path (written after every head)")
    parser.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", type=float,
                        help="dense bf16 peak of the device in TFLOP/s (default: from the device name)")  # fmt: skip
    parser.add_argument("--budget-s", "--budget_s", dest="budget_s", type=float, default=420.0,
                        help="time for the whole run, in seconds (default 420)")  # fmt: skip
    parser.add_argument("--head-budget-s", "--head_budget_s", dest="head_budget_s", type=float, default=45.0,
                        help="time for one head, both precisions, in seconds (default 45)")  # fmt: skip
    parser.add_argument("--warmup", type=int, help="warm-up steps per precision (default 5, tiny 1)")
    parser.add_argument("--iters", type=int, help="timed bf16 steps (default 50, tiny 2)")
    parser.add_argument("--fp16-iters", "--fp16_iters", dest="fp16_iters", type=int,
                        help="timed fp16 steps (default 20, tiny 2)")  # fmt: skip
    parser.add_argument("--heads", help="comma-separated head class names to run (default: all)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.iters = args.iters if args.iters is not None else (2 if args.tiny else 50)
    args.fp16_iters = args.fp16_iters if args.fp16_iters is not None else (2 if args.tiny else 20)
    for name in ("warmup", "iters", "fp16_iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be at least 1 (warm-up: 0)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}). Run it on the GPU machine, or `--device cpu --tiny` for the CPU "
            "smoke run.",
            file=sys.stderr,
        )
        return 2
    cases = CASES
    if args.heads:
        wanted = set(args.heads.split(","))
        unknown = wanted - {name for name, _ in CASES}
        if unknown:
            print(f"gpu_check: unknown heads {sorted(unknown)}; choose from {[n for n, _ in CASES]}", file=sys.stderr)
            return 2
        cases = [case for case in CASES if case[0] in wanted]
    import perceiver_hf  # noqa: F401  (after the device check, which should answer fast)

    if device.type == "cpu":
        from common import _register_cpu_flash_attention_flops

        _register_cpu_flash_attention_flops()  # FlopCounterMode counts the CUDA attention kernels only
    run_deadline = started + args.budget_s

    env = environment(device)
    if args.peak_tflops:
        peak_tflops, peak_source = args.peak_tflops, "--peak-tflops"
    else:
        peak_tflops, peak_source = default_peak(env["device_name"])
    matmul_size = 8192 if device.type == "cuda" else 512 if args.tiny else 2048
    report: dict[str, Any] = {
        "environment": env,
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "peak_bf16_tflops": peak_tflops,
        "peak_source": peak_source,
        "matmul_size": matmul_size,
        "matmul_bf16_tflops": matmul_tflops(device, matmul_size, repeats=20 if device.type == "cuda" else 2),
        "rows": [],
    }
    for name, make in cases:
        left = run_deadline - time.perf_counter()
        if left < 0.25 * args.head_budget_s:
            row = {"head": name, "status": "skipped",
                   "note": f"skipped: {max(left, 0):.0f} s left of the {args.budget_s:.0f} s run budget"}  # fmt: skip
        else:
            row = run_case(name, make, device, args, run_deadline, peak_tflops, report["matmul_bf16_tflops"])
        report["rows"].append(row)
        report["elapsed_s"] = time.perf_counter() - started
        write_json(report, args.output)
        step_ms = fmt(row.get("bf16", {}).get("step_s"), ".1f", 1e3)
        progress = f"{row['status']}, {step_ms} ms per bf16 step {row.get('note', '')}"
        print(f"[gpu_check] {name}: {progress} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print(markdown(report))
    return 1 if any(row["status"] == "error" for row in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
