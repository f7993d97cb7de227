"""Workloads, matched architectures, synthetic batches and the measurement of one configuration.

Every library is measured on the same synthetic batch, with the same architecture sizes
(`Architecture`), in a process of its own (see `run.py`). `Measurement` measures one
(library, workload, architecture) step by step: inference, then training steps (forward + loss +
backward + AdamW step), with the executed FLOPs counted in untimed runs and the peak RSS read after
each phase; `measure()` runs all of its steps in a row.

Precision `"bf16"` runs every forward pass (inference, and the training step's forward and loss) under
`torch.autocast("cpu", dtype=torch.bfloat16)`, the weights, gradients and optimizer state staying fp32: mixed
precision as Accelerate and `Trainer(bf16=True)` do it. The backward pass runs outside the autocast region, as
they do; autograd replays the casts.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

__all__ = [
    "Architecture",
    "Workload",
    "Runner",
    "Measurement",
    "WORKLOADS",
    "QUICK_WORKLOADS",
    "ARCHITECTURES",
    "QUICK_ARCHITECTURES",
    "PRECISIONS",
    "make_batch",
    "measure",
    "matmul_gflops",
    "autocast",
    "rss_bytes",
    "peak_rss_bytes",
]

MASK_TOKEN_ID = 4  # ids 0-4 play the special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) of the WordPiece vocabulary
MASKING_PROBABILITY = 0.15
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # bf16: autocast over fp32 weights


@dataclass(frozen=True)
class Architecture:
    """The sizes every library is built with.

    `mlp` is `"gelu"` (GELU MLP, widening factor `widening_factor`: transformers' and krasserm's) or
    `"geglu"` (GEGLU MLP, widening factor 4 fixed, lucidrains'). Each peer is compared with our model
    built in its own MLP flavour, so that both sides run the same layers.
    """

    name: str
    mlp: str = "gelu"
    num_latents: int = 256
    d_latents: int = 512
    d_model: int = 512  # text: embedding width (the encoder's input channels)
    num_self_attention_layers: int = 6
    num_heads: int = 8  # cross- and self-attention heads
    widening_factor: int = 1
    vocab_size: int = 10000
    # masked-LM decoder: transformers fixes it at 8 heads with 256 query-key channels
    mlm_decoder_heads: int = 8
    mlm_decoder_qk_channels: int = 256

    def describe(self) -> str:
        mlp = f"GELU x{self.widening_factor}" if self.mlp == "gelu" else f"GEGLU x{self.widening_factor}"
        return (
            f"{self.num_latents} latents x {self.d_latents}, 1 cross-attention + {self.num_self_attention_layers} "
            f"self-attention layers, {self.num_heads} heads, MLP {mlp}"
        )


ARCHITECTURES = {
    "gelu": Architecture("gelu"),
    "geglu": Architecture("geglu", mlp="geglu", widening_factor=4),
}
QUICK_ARCHITECTURES = {
    "gelu": Architecture("gelu", num_latents=32, d_latents=64, d_model=64, num_self_attention_layers=2,
                         vocab_size=1000),
    "geglu": Architecture("geglu", mlp="geglu", widening_factor=4, num_latents=32, d_latents=64, d_model=64,
                          num_self_attention_layers=2, vocab_size=1000),
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """One benchmark input: masked LM on `seq_len` tokens, or image classification of `image_shape` images."""

    name: str
    task: str  # "mlm" | "image"
    batch_size: int
    seq_len: int = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)  # (height, width, channels)
    num_frequency_bands: int = 0
    num_classes: int = 0
    repeats: int = 3

    @property
    def num_inputs(self) -> int:
        return self.seq_len if self.task == "mlm" else self.image_shape[0] * self.image_shape[1]

    def describe(self) -> str:
        if self.task == "mlm":
            return f"masked LM, {self.seq_len} tokens, batch {self.batch_size}"
        h, w, c = self.image_shape
        return f"image {h}x{w}x{c} ({self.num_inputs:,} inputs), batch {self.batch_size}"


# Batches are small because the benchmark machines have 2 shared CPU cores; the (inputs x latents)
# terms, where the libraries differ, dominate at the long inputs.
WORKLOADS = {
    "mlm-512": Workload("mlm-512", "mlm", batch_size=4, seq_len=512, repeats=2),
    "mlm-2048": Workload("mlm-2048", "mlm", batch_size=1, seq_len=2048, repeats=2),
    "mlm-8192": Workload("mlm-8192", "mlm", batch_size=1, seq_len=8192, repeats=1),
    "img-28x28x1": Workload("img-28x28x1", "image", batch_size=4, image_shape=(28, 28, 1),
                            num_frequency_bands=32, num_classes=10),
    "img-224x224x3": Workload("img-224x224x3", "image", batch_size=1, image_shape=(224, 224, 3),
                              num_frequency_bands=64, num_classes=1000, repeats=1),
}  # fmt: skip
QUICK_WORKLOADS = {
    "mlm-256": Workload("mlm-256", "mlm", batch_size=2, seq_len=256, repeats=2),
    "img-28x28x1": Workload("img-28x28x1", "image", batch_size=2, image_shape=(28, 28, 1),
                            num_frequency_bands=8, num_classes=10, repeats=2),
}  # fmt: skip


@dataclass
class Runner:
    """A built model and how to run it: `train_loss(batch)` in train mode, `infer(batch)` in eval mode."""

    model: nn.Module
    train_loss: Callable[[dict], torch.Tensor]
    infer: Callable[[dict], torch.Tensor]
    prepare: Callable[[dict], dict] = lambda batch: batch
    notes: list[str] = field(default_factory=list)


def make_batch(workload: Workload, arch: Architecture, seed: int = 0) -> dict[str, torch.Tensor]:
    """The synthetic batch every library gets: token ids with 15% masked and labels, or channels-last images."""
    generator = torch.Generator().manual_seed(seed)
    b = workload.batch_size
    if workload.task == "mlm":
        n = workload.seq_len
        input_ids = torch.randint(5, arch.vocab_size, (b, n), generator=generator)
        masked = torch.rand(b, n, generator=generator) < MASKING_PROBABILITY
        masked[:, 0] = True  # every row has a label
        labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
        input_ids = torch.where(masked, torch.full_like(input_ids, MASK_TOKEN_ID), input_ids)
        return {"input_ids": input_ids, "labels": labels}
    h, w, c = workload.image_shape
    return {
        "images": torch.randn(b, h, w, c, generator=generator),  # (B, H, W, C)
        "labels": torch.randint(0, workload.num_classes, (b,), generator=generator),
    }


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_gflops(size: int = 2048, seconds: float = 2.0, precision: str = "fp32") -> float:
    """Best GFLOP/s of a `size` x `size` matmul in `precision` ("fp32" or "bf16": both operands and the
    output in that dtype, the kernel that autocast reaches) with the current thread count."""
    dtype = PRECISIONS[precision]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The autocast region of `precision`: bf16 autocast on CPU for "bf16", nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=PRECISIONS[precision])


def _register_cpu_flash_attention_flops() -> None:
    """Teach `FlopCounterMode` the CPU flash-attention kernels (it counts the CUDA ones only), so that
    SDPA models are counted without switching them to explicit matmuls."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(backward)
    def _backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class Measurement:
    """The measurement of one (library, workload, architecture) in this process, one step at a time.

    The phases run in this order: `start_inference()`, `infer()` (timed, call it repeatedly),
    `end_inference()`, `start_training()`, `train()` (timed), `finish()`. Inference runs first, so the
    peak RSS read after it is the inference peak and the one read at the end the training peak; both
    are taken above the RSS before the model was built, so they count weights, gradients, optimizer
    state, activations and allocator overhead, not the imports. FLOPs are counted in untimed runs.
    `precision` "bf16" runs the forward passes under bf16 autocast (see the module docstring).
    `run.py` drives several of these, one per subprocess, in turn, so that the timed steps of all
    libraries interleave and a change in the machine's load affects them alike.
    """

    def __init__(
        self,
        build: Callable[[Workload, Architecture], Runner],
        workload: Workload,
        arch: Architecture,
        count_flops: bool = True,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
        self.precision = precision
        _register_cpu_flash_attention_flops()
        _warm_up(build, workload, arch, precision)
        gc.collect()
        self.baseline = rss_bytes()
        torch.manual_seed(0)
        self.runner = build(workload, arch)
        self.model = self.runner.model
        self.batch = self.runner.prepare(make_batch(workload, arch))
        self.count_flops = count_flops
        self.optimizer: torch.optim.Optimizer | None = None
        self.infer_times: list[float] = []
        self.train_times: list[float] = []
        self.result: dict = {
            "workload": asdict(workload),
            "arch": asdict(arch),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "notes": self.runner.notes,
            "threads": torch.get_num_threads(),
            "precision": precision,
        }

    def _flop_counter(self) -> contextlib.AbstractContextManager:
        from torch.utils.flop_counter import FlopCounterMode

        return FlopCounterMode(display=False) if self.count_flops else contextlib.nullcontext()

    def start_inference(self) -> None:
        self.model.eval()
        with torch.inference_mode(), autocast(self.precision):
            self.runner.infer(self.batch)  # warm-up

    def infer(self) -> float:
        with torch.inference_mode(), autocast(self.precision):
            start = time.perf_counter()
            self.runner.infer(self.batch)
            elapsed = time.perf_counter() - start
        self.infer_times.append(elapsed)
        return elapsed

    def end_inference(self) -> None:
        gc.collect()
        self.result["infer_peak_bytes"] = peak_rss_bytes() - self.baseline
        if self.count_flops:
            # Counted after the inference peak is read, with autograd on: FlopCounterMode's module tracker
            # fails under no_grad and inference_mode (torch 2.13); the forward runs the same matmuls.
            with self._flop_counter() as counter, autocast(self.precision):
                self.runner.infer(self.batch)
            self.result["infer_flops"] = counter.get_total_flops()
            gc.collect()

    def _step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.precision):
            loss = self.runner.train_loss(self.batch)
        loss.backward()
        self.optimizer.step()

    def start_training(self) -> None:
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        with self._flop_counter() as counter:
            self._step()  # warm-up; also allocates the optimizer state
        if self.count_flops:
            self.result["train_flops"] = counter.get_total_flops()

    def train(self) -> float:
        start = time.perf_counter()
        self._step()
        elapsed = time.perf_counter() - start
        self.train_times.append(elapsed)
        return elapsed

    def finish(self) -> dict:
        """The result; times are the best of the timed steps, as other processes only ever add time."""
        gc.collect()
        if self.infer_times:
            self.result |= {"infer_s": min(self.infer_times), "infer_times_s": self.infer_times}
        if self.train_times:
            self.result |= {"train_s": min(self.train_times), "train_times_s": self.train_times}
            self.result["train_peak_bytes"] = peak_rss_bytes() - self.baseline
        return self.result


def measure(
    build: Callable[[Workload, Architecture], Runner],
    workload: Workload,
    arch: Architecture,
    repeats: int | None = None,
    count_flops: bool = True,
    phases: tuple[str, ...] = ("infer", "train"),
    precision: str = "fp32",
) -> dict:
    """Measure one configuration in this process alone: `repeats` inference runs, then training steps."""
    repeats = repeats or workload.repeats
    measurement = Measurement(build, workload, arch, count_flops=count_flops, precision=precision)
    if "infer" in phases:
        measurement.start_inference()
        for _ in range(repeats):
            measurement.infer()
        measurement.end_inference()
    if "train" in phases:
        measurement.start_training()
        for _ in range(repeats):
            measurement.train()
    return measurement.finish()


def _warm_up(
    build: Callable[[Workload, Architecture], Runner], workload: Workload, arch: Architecture, precision: str = "fp32"
) -> None:
    """Run a tiny model of the same library once, in the measured precision, so that lazily imported modules
    and first-call allocations (autograd engine, optimizer, thread pools, bf16 kernels) are not counted in
    the measured memory."""
    tiny_arch = QUICK_ARCHITECTURES[arch.name]
    if workload.task == "mlm":
        tiny = replace(workload, batch_size=1, seq_len=16)
    else:
        tiny = replace(workload, batch_size=1, image_shape=(8, 8, workload.image_shape[2]), num_frequency_bands=4)
    runner = build(tiny, tiny_arch)
    batch = runner.prepare(make_batch(tiny, tiny_arch))
    optimizer = torch.optim.AdamW(runner.model.parameters(), lr=1e-4)
    with autocast(precision):
        loss = runner.train_loss(batch)
    loss.backward()
    optimizer.step()
    with torch.inference_mode(), autocast(precision):
        runner.model.eval()
        runner.infer(batch)
    del runner, batch, optimizer
    gc.collect()
