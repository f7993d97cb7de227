"""Masked-LM training and inference step in fp32 and under bf16 autocast, against this machine's matmul rates.

The issue-14 workload: sequence 512, batch 8, 256 x 512 latents, 6 self-attention layers, 8 heads, vocabulary
10,003 (DeepMind's language Perceiver, smaller). For each precision: seconds per step (median of `--repeats`),
the FLOPs the step executes (counted by `torch.utils.flop_counter.FlopCounterMode`), and their rate as a fraction
of the 2048 x 2048 matmul rate of the same precision, measured in the same run.

FLOP counting: `FlopCounterMode` has formulas for the CUDA attention kernels only, so SDPA's CPU flash-attention
kernels (`_scaled_dot_product_flash_attention_for_cpu` and its backward) would count zero;
`common._register_cpu_flash_attention_flops` (shared with `run.py`) adds them. The inference step's FLOPs are
counted on the same forward pass with autograd on: the module tracker of `FlopCounterMode` fails under
`torch.no_grad()` ("Expected gradient function to be set") and `torch.inference_mode()` in torch 2.13, and
the model is in eval mode either way and runs the same matmuls, so the count is that of the timed step.
`benchmarks/run.py --precision fp32,bf16` measures every peer library the same way.

    python benchmarks/precision.py                      # prints a Markdown table
    python benchmarks/precision.py --threads 2 --repeats 5 --seq-len 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
from common import _register_cpu_flash_attention_flops  # benchmarks/common.py: run as `python benchmarks/...`
from torch.utils.flop_counter import FlopCounterMode

from perceiver_hf import PerceiverConfig, PerceiverForMaskedLM


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a `size` x `size` matmul in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def build(args: argparse.Namespace) -> PerceiverForMaskedLM:
    config = PerceiverConfig(
        vocab_size=10_003, max_position_embeddings=args.seq_len, d_model=args.d_model,
        num_latents=256, d_latents=512, num_self_attention_layers_per_block=6,
        num_cross_attention_heads=8, num_self_attention_heads=8, num_decoder_heads=8,
        cross_attention_widening_factor=1, self_attention_widening_factor=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return PerceiverForMaskedLM(config)


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _register_cpu_flash_attention_flops()  # SDPA's CPU flash kernels, which FlopCounterMode does not count itself

    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 10_003, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.15, input_ids, -100)

    rows = []
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        rate = matmul_rate(dtype or torch.float32)

        def train_step(dtype=dtype):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer_step(dtype=dtype):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                model(input_ids=input_ids)

        def forward_only(dtype=dtype):  # the inference step's FLOPs, counted with autograd on (see below)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                model(input_ids=input_ids)

        for kind, step, counted, mode in (
            ("training", train_step, train_step, model.train),
            ("inference", infer_step, forward_only, model.eval),
        ):
            mode()
            # Inference FLOPs are counted with autograd on (see the module docstring): the same matmuls.
            with FlopCounterMode(display=False) as counter:
                counted()
            flops = counter.get_total_flops()
            seconds = timed(step, args.repeats)
            rows.append((name, kind, seconds, flops, flops / seconds, rate))

    print(f"Processor: {processor()}; torch {torch.__version__}; {args.threads} threads; batch {args.batch_size} x "
          f"{args.seq_len} tokens")  # fmt: skip
    print("\n| precision | step | seconds | GFLOP executed | GFLOP/s | matmul GFLOP/s (same dtype) | fraction |")
    print("|---|---|---|---|---|---|---|")
    for name, kind, seconds, flops, flop_rate, rate in rows:
        print(f"| {name} | {kind} | {seconds:.3f} | {flops / 1e9:.1f} | {flop_rate / 1e9:.0f} | {rate / 1e9:.0f} | "
              f"{flop_rate / rate:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
