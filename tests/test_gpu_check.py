"""The prepared GPU check (`benchmarks/gpu_check.sh`, `benchmarks/gpu_check.py`), run on the CPU with tiny configs.

The real check needs a GPU (issue 14); here its `--device cpu --tiny` smoke run, through the same wrapper, must
train every head the package exports in both precisions (bf16 autocast; fp16 autocast with `GradScaler("cpu")`,
which torch supports on the CPU) with finite losses and positive throughput, find the SDPA backend and count FLOPs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

import perceiver_hf

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ROOT / "benchmarks" / "gpu_check.sh"


def run_wrapper(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(WRAPPER), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False
    )


def exported_heads() -> set[str]:
    """Every exported model class with a task head (the bare encoders `PerceiverModel` / `PerceiverARModel` and the
    base classes have no loss)."""
    return {
        name
        for name in perceiver_hf.__all__
        if "For" in name and isinstance(getattr(perceiver_hf, name), type)
        and issubclass(getattr(perceiver_hf, name), PreTrainedModel)
    }  # fmt: skip


def test_tiny_cpu_run_trains_every_head_in_both_precisions(tmp_path: Path) -> None:
    output = tmp_path / "gpu_check.json"
    result = run_wrapper("--device", "cpu", "--tiny", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    rows = {row["head"]: row for row in report["rows"]}
    assert set(rows) == exported_heads()
    assert report["environment"]["torch"] == torch.__version__ and report["matmul_bf16_tflops"] > 0
    for head, row in rows.items():
        assert row["status"] == "ok", (head, row.get("note"))
        for precision in ("bf16", "fp16"):
            phase = row[precision]
            assert phase["losses_finite"] and math.isfinite(phase["loss_last"]), (head, precision)
            assert phase["timed_steps"] >= 1 and phase["samples_per_s"] > 0 and phase["tokens_per_s"] > 0
        assert row["fp16"]["skipped_steps"] >= 0 and row["fp16"]["loss_scale"] > 0
        bf16 = row["bf16"]
        assert bf16["flops_per_step"] > 0 and bf16["tflops_per_s"] > 0 and bf16["mfu_matmul"] > 0
        # On CPU, bf16 attention over few keys runs as matmuls (`sdpa_prefers_matmul`): tiny models record those.
        assert bf16["sdpa"]["backends"], f"{head}: the profiler recorded no attention call"
    # The Markdown table: a header and one line per head.
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| head |") and len(table) == 1 + len(rows)


def test_spent_budget_skips_heads_with_a_note(tmp_path: Path) -> None:
    output = tmp_path / "gpu_check.json"
    result = run_wrapper("--device", "cpu", "--tiny", "--budget-s", "0", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert len(rows) == len(exported_heads())
    assert all(row["status"] == "skipped" and "run budget" in row["note"] for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without a CUDA device")
def test_wrapper_fails_clearly_without_a_gpu() -> None:
    result = run_wrapper("--output", "unused.json")
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_attention_backends_count_each_call_once() -> None:
    """SDPA's math backend runs its own softmax: that call is "math", not also the matmul path."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 4, 8)

    def math_sdpa():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    def matmuls():
        return (q @ q.transpose(-1, -2)).softmax(-1) @ q

    assert gpu_check.sdpa_backends(math_sdpa, torch.device("cpu"))["backends"] == {"math": 1}
    assert gpu_check.sdpa_backends(matmuls, torch.device("cpu"))["backends"] == {"matmul + softmax": 1}
