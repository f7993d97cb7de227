"""Cheap checks of `benchmarks/` (the benchmark itself takes tens of minutes and runs by hand).

- the precision choice: bf16 by default only where its matmul rate is at least `FAST_BF16` times fp32's,
  with a line saying why;
- the table: a precision column, ratios ours/peer within one precision, FLOP utilisation against the matmul
  rate of the row's precision, failing peers reported with their error;
- `Measurement` under bf16 autocast on a tiny model: weights stay fp32, FLOPs (SDPA's CPU flash kernels
  included) counted alike in both precisions;
- a library failing under autocast is replied as an error with its first line.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _import_benchmarks(*names: str) -> list:
    """Import `benchmarks/` modules, which import each other as `common`, ..., without leaving them in
    `sys.modules`: the example scripts' own `common` (tests/test_examples_common.py) has the same name."""
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


common, run, bench_ours = _import_benchmarks("common", "run", "bench_ours")


def test_precisions_default_to_bf16_only_where_it_is_fast():
    precisions, note = run._choose_precisions(None, {"fp32": 100.0, "bf16": 250.0})
    assert precisions == ["fp32", "bf16"] and "2.50x" in note
    precisions, note = run._choose_precisions(None, {"fp32": 100.0, "bf16": 90.0})
    assert precisions == ["fp32"] and "no fast bf16" in note and "not above the fp32 rate" in note
    precisions, note = run._choose_precisions("bf16,fp32", {"fp32": 100.0, "bf16": 90.0})
    assert precisions == ["fp32", "bf16"] and "as requested" in note and "no fast bf16" in note


def _result(train_s: float, infer_s: float, peak: int, flops: float = 1e9) -> dict:
    return {"parameters": 1e6, "train_s": train_s, "infer_s": infer_s, "train_peak_bytes": peak,
            "infer_peak_bytes": peak, "train_flops": flops}  # fmt: skip


def test_table_compares_within_one_precision():
    rows = [
        {"workload": "w", "arch": "gelu", "precision": "fp32", "library": "ours", "result": _result(1.0, 1.0, 100)},
        {"workload": "w", "arch": "gelu", "precision": "fp32", "library": "peer", "result": _result(2.0, 4.0, 200)},
        {"workload": "w", "arch": "gelu", "precision": "bf16", "library": "ours", "result": _result(0.5, 0.5, 100)},
        {"workload": "w", "arch": "gelu", "precision": "bf16", "library": "peer", "result": _result(0.5, 1.0, 50)},
        {"workload": "w", "arch": "gelu", "precision": "bf16", "library": "other",
         "result": {"error": "bf16 training: RuntimeError: expected BFloat16"}},
    ]  # fmt: skip
    lines = run._table(rows, {"w": {"fp32": 2.0, "bf16": 4.0}})
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["workload", "arch", "precision", "library"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(header) for c in cells)
    col = {name: header.index(name) for name in ("train FLOP util", "train ours/peer", "infer ours/peer")}
    # 1 GFLOP in 1 s against 2 GFLOP/s (fp32), in 0.5 s against 4 GFLOP/s (bf16)
    assert cells[0][col["train FLOP util"]] == "50%" and cells[2][col["train FLOP util"]] == "50%"
    assert cells[1][col["train ours/peer"]] == "0.50" and cells[1][col["infer ours/peer"]] == "0.25"
    assert cells[3][col["train ours/peer"]] == "1.00" and cells[3][col["infer ours/peer"]] == "0.50"
    assert cells[4][4] == "bf16 training: RuntimeError: expected BFloat16"
    targets = run._targets(rows)
    assert targets[0].startswith("- w: train time ours/peer <= 0.50")
    assert targets[1].startswith("- w (bf16): train time ours/peer <= 1.00")
    speedups = run._bf16_against_fp32(rows)
    assert any(line.startswith("| w | gelu | ours | 2.00 | 2.00 |") for line in speedups)


def test_measurement_under_bf16_autocast():
    torch.set_num_threads(1)
    workload = common.Workload("mlm-32", "mlm", batch_size=1, seq_len=32, repeats=1)
    arch = common.QUICK_ARCHITECTURES["gelu"]
    with pytest.raises(ValueError, match="unknown precision"):
        common.Measurement(bench_ours.build, workload, arch, precision="fp8")
    results = {}
    for precision in ("fp32", "bf16"):
        measurement = common.Measurement(bench_ours.build, workload, arch, precision=precision)
        measurement.start_inference()
        measurement.infer()
        measurement.end_inference()
        measurement.start_training()
        measurement.train()
        results[precision] = result = measurement.finish()
        assert result["precision"] == precision and result["train_s"] > 0 and result["infer_s"] > 0
        # autocast: weights and gradients stay fp32
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in measurement.model.parameters())
    # The forward runs the same matmuls in both precisions. In bf16 the attention over these few keys runs as
    # matmuls (`sdpa_prefers_matmul`), whose backward does not recompute the scores as SDPA's flash kernel's does.
    assert results["bf16"]["infer_flops"] == results["fp32"]["infer_flops"] > 0
    assert 0.9 * results["fp32"]["train_flops"] < results["bf16"]["train_flops"] < results["fp32"]["train_flops"]


def test_matmul_rate_per_precision():
    assert common.matmul_gflops(size=128, seconds=0.05, precision="bf16") > 0
    assert common.matmul_gflops(size=128, seconds=0.05) > 0


def test_error_line_is_the_first_line():
    assert run._error_line(RuntimeError("expected BFloat16\nbut found Float")) == "RuntimeError: expected BFloat16"
    assert run._error_line(ValueError()) == "ValueError"
