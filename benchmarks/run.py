"""Speed and memory of `perceiver_hf` side by side with the Perceiver libraries a user would pick instead.

```
python benchmarks/run.py            # full table (tens of minutes on 2 CPU cores), writes benchmarks/RESULTS.md
python benchmarks/run.py --quick    # smoke run: tiny models, two small workloads, a few minutes
python benchmarks/run.py --precision fp32   # fp32 rows only (default: fp32 and bf16 where bf16 is fast)
```

Each library runs in its own subprocess (its own peak memory), all libraries of a workload at once,
and their timed steps go round-robin: inference of each library in turn, repeated, then training steps
(forward + loss + backward + AdamW step) likewise, so a change in the load of a shared machine hits every
library alike. Each subprocess also reads its peak RSS and counts the executed FLOPs with
`torch.utils.flop_counter`. The fp32 and bf16 matmul rates of the machine (2048 x 2048) are measured in the
same run, before and after the table and between the steps of every workload; the best rate of a row's
precision sampled while its workload ran is the denominator of its FLOP utilisation.
Each peer is compared with our model built to its architecture (`common.Architecture`): `ours/peer`
below 1 means we are faster or smaller.

Precisions (`--precision`): fp32, and bf16, where every library's inference and training step run under
`torch.autocast("cpu", dtype=torch.bfloat16)` with fp32 weights (mixed precision as Accelerate and the Trainer
do it), on the same batches. By default bf16 is measured only where the machine's bf16 matmul is at least
`FAST_BF16` times as fast as its fp32 one (bf16 hardware: AVX512-BF16, AMX); elsewhere the report says why and
has fp32 rows only. A workload's precisions run one after the other, each one round-robin over the libraries
(running both at once would double the processes held in memory); `ours/peer` compares rows of the same
precision. A library that fails in a precision is reported with the error's first line.

Besides the table, the full run checks two targets on our model alone: training memory linear in input
length (a 65,536-token sequence and a 512x512x3 image at batch 1) and `torch.compile(fullgraph=True)` of
the encoder against eager inference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RESULT_PREFIX = "BENCHMARK_RESULT: "
LIBRARIES = ("ours", "transformers", "krasserm", "lucidrains")
MATMUL_PROBE = "matmul"  # a pseudo-library in the round-robin: samples the machine's matmul rate
PRECISIONS = ("fp32", "bf16")
FAST_BF16 = 1.2  # bf16 is measured by default when its matmul rate is at least this multiple of the fp32 rate
MODULES = {
    "ours": "bench_ours",
    "transformers": "bench_transformers",
    "krasserm": "bench_krasserm",
    "lucidrains": "bench_lucidrains",
}
TARGET_TRAIN_RATIO = 0.75
MEMORY_BUDGET_BYTES = 8 * 1024**3
COMPILE_WORKLOADS = ("mlm-512", "img-28x28x1")  # compiling takes minutes per workload on 2 shared cores


# ---------------------------------------------------------------------------------------------------
# Worker side: one measurement in this process, printed as JSON
# ---------------------------------------------------------------------------------------------------


def _setup_worker(threads: int) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(REPO_ROOT))  # perceiver_hf without `pip install -e .`
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # peers' deprecation warnings would bury the results


def _worker(spec: dict) -> dict:
    _setup_worker(spec["threads"])
    from common import matmul_gflops, measure

    kind = spec["kind"]
    if kind == "matmul":
        return {"matmul_gflops": {precision: matmul_gflops(precision=precision) for precision in PRECISIONS}}
    workload, arch = _spec_workload_arch(spec)
    if kind == "scaling":
        import bench_ours

        def build(w, a):
            runner = bench_ours.build(w, a)
            if spec.get("gradient_checkpointing"):
                runner.model.activation_checkpointing_enable()
            return runner

        return measure(build, workload, arch, repeats=1, count_flops=False, phases=("train",))
    if kind == "compile":
        return _compile_check(workload, arch, spec.get("repeats") or workload.repeats)
    raise ValueError(f"unknown worker kind {kind!r}")


def _reply(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _spec_workload_arch(spec: dict):
    from common import ARCHITECTURES, QUICK_ARCHITECTURES, Workload

    architectures = QUICK_ARCHITECTURES if spec["quick"] else ARCHITECTURES
    workload = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["workload"].items()})
    return workload, architectures[spec["arch"]]


SERVE_COMMANDS = ("start_inference", "infer", "end_inference", "start_training", "train")


def _error_line(error: BaseException) -> str:
    """`Type: first line of the message`: how a failing library is reported in the table."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _serve(spec: dict) -> None:
    """Build one library's model, then run the measurement steps that the orchestrator sends on stdin.

    An exception (a library failing under bf16 autocast, say) is replied as `{"error": ...}` with its first
    line and the phase it happened in, and ends the worker."""
    _setup_worker(spec["threads"])
    import importlib

    from common import Measurement

    precision = spec.get("precision", "fp32")
    if spec["library"] == MATMUL_PROBE:
        measurement = _MatmulProbe(precision)
    else:
        workload, arch = _spec_workload_arch(spec)
        module = importlib.import_module(MODULES[spec["library"]])
        reason = module.unavailable()
        if reason:
            _reply({"skipped": reason})
            return
        try:
            measurement = Measurement(module.build, workload, arch, precision=precision)
        except Exception as error:
            _reply({"error": f"{precision} build: {_error_line(error)}"})
            return
    _reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "finish":
            _reply(measurement.finish())
            return
        if command not in SERVE_COMMANDS:
            raise ValueError(f"unknown command {command!r}")
        try:
            value = getattr(measurement, command)()
        except Exception as error:
            phase = "inference" if "infer" in command else "training"
            _reply({"error": f"{precision} {phase}: {_error_line(error)}"})
            return
        _reply({"value": value})


class _MatmulProbe:
    """The rate of a 2048 x 2048 matmul in one precision, sampled at every step of the round-robin: the
    FLOP utilisation of a workload uses the best rate seen while that workload ran."""

    def __init__(self, precision: str = "fp32") -> None:
        self.precision = precision
        self.rates: list[float] = []

    def _sample(self) -> float:
        from common import matmul_gflops

        rate = matmul_gflops(seconds=0.5, precision=self.precision)
        self.rates.append(rate)
        return rate

    start_inference = infer = end_inference = start_training = train = _sample

    def finish(self) -> dict:
        return {"matmul_gflops": max(self.rates, default=0.0), "matmul_samples": self.rates}


def _compile_check(workload, arch, repeats: int) -> dict:
    """Eager vs `torch.compile(fullgraph=True)` inference of our encoder (`PerceiverModel`)."""
    import bench_ours
    import torch
    import torch._inductor.config as inductor_config
    from common import make_batch

    torch.manual_seed(0)
    encoder = bench_ours.build_encoder(workload, arch).eval()
    batch = make_batch(workload, arch)
    key = "input_ids" if workload.task == "mlm" else "pixel_values"
    inputs = batch["input_ids"] if workload.task == "mlm" else batch["images"]

    def run(model):
        return model(**{key: inputs}).last_hidden_state

    models, compile_s, max_abs_diff = {"eager": encoder}, {}, 0.0
    with torch.no_grad():
        expected = run(encoder)
        # "freezing" lets inductor treat the weights as constants (pre-packed oneDNN matmuls on CPU):
        # an inference-only option, off by default.
        for name, freezing in (("compiled", False), ("compiled_freezing", True)):
            torch._dynamo.reset()
            with inductor_config.patch(freezing=freezing):
                models[name] = torch.compile(encoder, fullgraph=True)  # fullgraph: any graph break raises
                start = time.perf_counter()
                out = run(models[name])
                compile_s[name] = time.perf_counter() - start
            max_abs_diff = max(max_abs_diff, float((out - expected).abs().max()))
        # The variants alternate, so a change in the machine's load hits all of them alike.
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(max(repeats, 3)):
            for name, model in models.items():
                start = time.perf_counter()
                run(model)
                times[name].append(time.perf_counter() - start)
    return {
        "eager_s": min(times["eager"]),
        "compiled_s": min(times["compiled"]),
        "compiled_freezing_s": min(times["compiled_freezing"]),
        "compile_s": compile_s,
        "max_abs_diff": max_abs_diff,
        "workload": asdict(workload),
    }


# ---------------------------------------------------------------------------------------------------
# Orchestrator side: subprocesses, table, RESULTS.md
# ---------------------------------------------------------------------------------------------------


def _run_subprocess(spec: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["wall_s"] = wall
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode in (-9, 137):
        tail = "killed (out of memory?)"
    return {"error": f"exit {proc.returncode}: {tail}"}


class _Worker:
    """A `--serve` subprocess measuring one library, driven one step at a time."""

    def __init__(self, spec: dict, timeout: float) -> None:
        self.timeout = timeout
        self.error: str | None = None
        self.buffer = b""
        # A file, not a pipe: a pipe could fill up with warnings and block the worker. Closed in close().
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(spec)]
        env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env, cwd=REPO_ROOT)  # fmt: skip

    def _fail(self, message: str) -> dict:
        self.error = message
        self.close()
        return {"error": message}

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def read(self) -> dict:
        """The next result line of the worker."""
        if self.error:
            return {"error": self.error}
        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    return self._fail(f"timed out after {self.timeout:.0f} s")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = self.proc.wait()
                    tail = "killed (out of memory?)" if code in (-9, 137) else self._stderr_tail()
                    return self._fail(f"exit {code}: {tail}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith(RESULT_PREFIX):  # other lines are the libraries' own prints
                return json.loads(text[len(RESULT_PREFIX) :])

    def call(self, command: str) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self.read()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _measure_side_by_side(specs: list[dict], repeats: int, timeout: float) -> list[dict]:
    """Measure several libraries on one workload, their timed steps interleaved.

    Every library runs in its own subprocess (its own memory peak), all started together; then the
    timed steps go round-robin: inference of A, B, C, A, B, C, ..., then training steps likewise. A
    change of the machine's load (other jobs) thus hits every library alike, which keeps the ratios
    meaningful on a shared machine.
    """
    workers = [_Worker(spec, timeout) for spec in specs]
    results: list[dict | None] = [None] * len(workers)
    for i, worker in enumerate(workers):
        reply = worker.read()  # "ready" once the model is built, or why not
        if "ready" not in reply:
            results[i] = reply
            worker.close()
    live = [i for i in range(len(workers)) if results[i] is None]
    plan = ["start_inference", *["infer"] * repeats, "end_inference", "start_training", *["train"] * repeats]
    for command in plan:
        for i in live:
            if results[i] is None:
                reply = workers[i].call(command)
                if "error" in reply:
                    results[i] = reply
    for i in live:
        if results[i] is None:
            results[i] = workers[i].call("finish")
        workers[i].close()
    return results


def _matmul_rates(base: dict) -> dict[str, float]:
    """The fp32 and bf16 rates (GFLOP/s) of a 2048 x 2048 matmul, in a subprocess of the run's thread count."""
    rates = _run_subprocess(base | {"kind": "matmul"}, 120).get("matmul_gflops", {})
    return {p: rates.get(p, 0.0) for p in PRECISIONS}


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    if not ours or not peer:
        return "-"
    return f"{ours / peer:.2f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def _hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "bf16_flags": sorted(f for f in flags if "bf16" in f),  # avx512_bf16, amx_bf16: bf16 matmul hardware
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "perceiver-io", "perceiver-pytorch", "einops", "fairscale"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _precision(row: dict) -> str:
    return row.get("precision", "fp32")


def _table(rows: list[dict], matmul: dict[str, dict[str, float]]) -> list[str]:
    """One markdown table: our row, then each peer with ours/peer ratios (time and peak memory), per precision.

    `matmul[workload][precision]` is the matmul rate (GFLOP/s) that the FLOP utilisation of a row divides by."""
    lines = [
        "| workload | arch | precision | library | params | train step | inference | train peak MB | infer peak MB "
        "| train FLOP util | train ours/peer | infer ours/peer | train mem ours/peer | infer mem ours/peer |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by_key = {(r["workload"], r["arch"], _precision(r), r["library"]): r for r in rows}
    for r in rows:
        res, precision = r["result"], _precision(r)
        if "error" in res or "skipped" in res:
            lines.append(f"| {r['workload']} | {r['arch']} | {precision} | {r['library']} "
                         f"| {res.get('error') or res['skipped']} | | | | | | | | | |")  # fmt: skip
            continue
        util = "-"
        rate = matmul.get(r["workload"], {}).get(precision)
        if res.get("train_flops") and res.get("train_s") and rate:
            util = f"{res['train_flops'] / res['train_s'] / 1e9 / rate:.0%}"
        ratios = ["", "", "", ""]
        if r["library"] != "ours":
            ours = by_key.get((r["workload"], r["arch"], precision, "ours"), {}).get("result", {})
            ratios = [
                _ratio(ours.get("train_s"), res.get("train_s")),
                _ratio(ours.get("infer_s"), res.get("infer_s")),
                _ratio(ours.get("train_peak_bytes"), res.get("train_peak_bytes")),
                _ratio(ours.get("infer_peak_bytes"), res.get("infer_peak_bytes")),
            ]
        lines.append(
            f"| {r['workload']} | {r['arch']} | {precision} | {r['library']} | {res['parameters'] / 1e6:.2f} M "
            f"| {_seconds(res.get('train_s'))} | {_seconds(res.get('infer_s'))} | {_mb(res.get('train_peak_bytes'))} "
            f"| {_mb(res.get('infer_peak_bytes'))} | {util} | " + " | ".join(ratios) + " |"
        )
    return lines


def _targets(rows: list[dict]) -> list[str]:
    """Per workload and precision: the worst ours/peer ratio of training time and of peak memory, against the
    targets. fp32 lines name the workload alone (as before bf16 rows existed), bf16 lines add "(bf16)"."""
    lines = []
    groups = dict.fromkeys((r["workload"], _precision(r)) for r in rows)
    for name, precision in groups:
        train, memory = [], []
        for r in rows:
            if (r["workload"], _precision(r)) != (name, precision) or r["library"] == "ours":
                continue
            if "train_s" not in r["result"]:
                continue
            ours = next((o["result"] for o in rows if o["workload"] == name and o["arch"] == r["arch"]
                         and _precision(o) == precision and o["library"] == "ours"), {})  # fmt: skip
            if "train_s" not in ours:
                continue
            train.append((ours["train_s"] / r["result"]["train_s"], r["library"]))
            memory.append((ours["train_peak_bytes"] / r["result"]["train_peak_bytes"], r["library"]))
        if not train:
            continue
        worst_t, worst_m = max(train), max(memory)
        label = name if precision == "fp32" else f"{name} ({precision})"
        lines.append(
            f"- {label}: train time ours/peer <= {worst_t[0]:.2f} (worst: {worst_t[1]}; target {TARGET_TRAIN_RATIO}: "
            f"{'met' if worst_t[0] <= TARGET_TRAIN_RATIO else 'missed'}); train peak memory ours/peer <= "
            f"{worst_m[0]:.2f} (worst: {worst_m[1]}; target 1.0: {'met' if worst_m[0] <= 1.0 else 'missed'})"
        )
    return lines


def _bf16_against_fp32(rows: list[dict]) -> list[str]:
    """Per library: the fp32 time over the bf16 time (the bf16 speed-up) and the bf16 peak memory over fp32's."""
    fp32 = {(r["workload"], r["arch"], r["library"]): r["result"] for r in rows if _precision(r) == "fp32"}
    lines = []
    for r in rows:
        if _precision(r) != "bf16":
            continue
        base, res = fp32.get((r["workload"], r["arch"], r["library"]), {}), r["result"]
        if "train_s" not in res or "train_s" not in base:
            continue
        lines.append(
            f"| {r['workload']} | {r['arch']} | {r['library']} | {_ratio(base['train_s'], res['train_s'])} "
            f"| {_ratio(base['infer_s'], res['infer_s'])} "
            f"| {_ratio(res['train_peak_bytes'], base['train_peak_bytes'])} "
            f"| {_ratio(res['infer_peak_bytes'], base['infer_peak_bytes'])} |"
        )
    if not lines:
        return []
    return [
        "",
        "## bf16 autocast against fp32 (same library and architecture)",
        "",
        "Speed-up = fp32 time / bf16 time (above 1: bf16 is faster); memory = bf16 peak / fp32 peak. The two "
        "precisions of a workload run one after the other, not interleaved, so these are noisier than ours/peer.",
        "",
        "| workload | arch | library | train speed-up | infer speed-up | train mem bf16/fp32 | infer mem bf16/fp32 |",
        "|---|---|---|--:|--:|--:|--:|",
        *lines,
    ]


def _choose_precisions(requested: str | None, rates: dict[str, float]) -> tuple[list[str], str]:
    """The precisions to measure and the report's line saying why: `requested` (comma-separated) if given, else
    fp32 and bf16 where the bf16 matmul rate is at least `FAST_BF16` times the fp32 rate, else fp32 alone."""
    fp32, bf16 = rates.get("fp32", 0.0), rates.get("bf16", 0.0)
    speedup = f"bf16 matmul {bf16:.0f} GFLOP/s = {bf16 / fp32:.2f}x fp32 {fp32:.0f} GFLOP/s" if fp32 else "no rate"
    fast = bool(fp32) and bf16 >= FAST_BF16 * fp32
    if requested:
        precisions = [p for p in PRECISIONS if p in requested.split(",")]
        why = f"as requested (--precision {requested})"
        if "bf16" in precisions and not fast:
            why += f"; this machine has no fast bf16 matmul ({speedup}), so bf16 autocast can only be slower"
        return precisions, f"{' and '.join(precisions)}, {why}."
    if fast:
        return ["fp32", "bf16"], (
            f"fp32 and bf16 autocast: this machine has a fast bf16 matmul ({speedup}, at least {FAST_BF16}x)."
        )
    return ["fp32"], (
        f"fp32 only: this machine has no fast bf16 matmul ({speedup}, below {FAST_BF16}x: the bf16 rate is not "
        "above the fp32 rate), so bf16 autocast would only add casts; `--precision fp32,bf16` measures it anyway."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and workloads: a smoke run")
    parser.add_argument("--workloads", help="comma-separated workload names (default: all of the mode)")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help=f"comma-separated subset of {LIBRARIES}")
    parser.add_argument("--repeats", type=int, help="timed repeats per phase (default: per workload)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument(
        "--precision",
        help=f"comma-separated subset of {PRECISIONS}; bf16 = bf16 autocast over fp32 weights (default: both where "
        f"the bf16 matmul rate is at least {FAST_BF16}x the fp32 rate, else fp32)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per subprocess step")
    parser.add_argument("--skip-table", action="store_true", help="skip the side-by-side table")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the long-input memory check")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile check (--quick skips it)")
    parser.add_argument("--output", type=Path, help="markdown report (default: benchmarks/RESULTS.md, not for --quick)")
    parser.add_argument("--json", type=Path, help="also save the raw results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        _serve(json.loads(args.serve))
        return
    if args.worker:
        result = _worker(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from common import ARCHITECTURES, QUICK_ARCHITECTURES, QUICK_WORKLOADS, WORKLOADS, Workload

    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    architectures = QUICK_ARCHITECTURES if args.quick else ARCHITECTURES
    if args.workloads:
        unknown = sorted(set(args.workloads.split(",")) - set(workloads))
        if unknown:
            parser.error(f"--workloads: unknown {unknown}; choose from {sorted(workloads)}")
        workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    libraries = args.libraries.split(",")
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        parser.error(f"--libraries: unknown {unknown}; choose from {list(LIBRARIES)}")
    if "ours" not in libraries:
        libraries.insert(0, "ours")
    if args.precision:
        unknown = sorted(set(args.precision.split(",")) - set(PRECISIONS))
        if unknown:
            parser.error(f"--precision: unknown {unknown}; choose from {list(PRECISIONS)}")
    peer_of = {"ours": ("gelu", "geglu"), "transformers": ("gelu",), "krasserm": ("gelu",), "lucidrains": ("geglu",)}

    started = time.time()
    base = {"threads": args.threads, "quick": args.quick}
    hardware = _hardware()
    print(f"# {hardware['cpu']}, {hardware['cores']} cores, torch {hardware['torch']}, {args.threads} threads, "
          f"load average {hardware['load_average'][0]:.1f}", flush=True)  # fmt: skip
    matmul = {p: [rate] for p, rate in _matmul_rates(base).items()}
    print(f"# matmul 2048x2048: fp32 {matmul['fp32'][0]:.0f} GFLOP/s, bf16 {matmul['bf16'][0]:.0f} GFLOP/s; "
          f"CPU bf16 flags: {', '.join(hardware['bf16_flags']) or 'none'}", flush=True)  # fmt: skip
    precisions, precision_note = _choose_precisions(args.precision, {p: r[0] for p, r in matmul.items()})
    print(f"# precision: {precision_note}", flush=True)

    rows = []
    matmul_by_workload: dict[str, dict[str, float]] = {}
    for (wname, workload), precision in (
        [] if args.skip_table else [(w, p) for w in workloads.items() for p in precisions]
    ):
        keys = []
        for aname in architectures:
            if aname != "gelu" and not any(aname in peer_of[lib] for lib in libraries if lib != "ours"):
                continue  # our model in an architecture that no requested peer uses
            keys += [(aname, library) for library in libraries if aname in peer_of[library]]
        specs = [base | {"library": library, "arch": aname, "workload": asdict(workload), "precision": precision}
                 for aname, library in keys]  # fmt: skip
        *results, probe = _measure_side_by_side(
            [*specs, base | {"library": MATMUL_PROBE, "precision": precision}],
            args.repeats or workload.repeats,
            args.timeout,
        )
        rate = matmul_by_workload.setdefault(wname, {})[precision] = probe.get("matmul_gflops", 0.0)
        print(f"{wname:>14} {precision} matmul: {rate:.0f} GFLOP/s (best while it ran)", flush=True)
        for (aname, library), result in zip(keys, results, strict=True):
            rows.append(
                {"workload": wname, "arch": aname, "precision": precision, "library": library, "result": result}
            )
            summary = (
                result.get("error")
                or result.get("skipped")
                or (
                    f"train {_seconds(result['train_s'])}, infer {_seconds(result['infer_s'])}, "
                    f"train peak {_mb(result['train_peak_bytes'])} MB"
                )
            )
            print(f"{wname:>14} {aname:>5} {precision} {library:>12}: {summary}", flush=True)

    extra: list[str] = []
    raw: dict = {"rows": rows}
    if not args.skip_scaling:
        extra += ["", "## Training memory against input length (ours, batch 1)", "",
                  "| input | inputs | gradient checkpointing | train step | train peak MB | within 8 GB |",
                  "|---|--:|---|--:|--:|---|"]  # fmt: skip
        if args.quick:
            cases = [Workload("mlm-1024", "mlm", 1, seq_len=1024), Workload("mlm-4096", "mlm", 1, seq_len=4096)]
        else:
            cases = [
                Workload("mlm-16384", "mlm", 1, seq_len=16384),
                Workload("mlm-65536", "mlm", 1, seq_len=65536),
                Workload("img-256x256x3", "image", 1, image_shape=(256, 256, 3), num_frequency_bands=64,
                         num_classes=1000),
                Workload("img-512x512x3", "image", 1, image_shape=(512, 512, 3), num_frequency_bands=64,
                         num_classes=1000),
            ]  # fmt: skip
        raw["scaling"] = []
        for workload in cases:
            # With checkpointing too for the largest inputs: it trades time for memory.
            for checkpointing in (False, True) if workload in cases[1::2] else (False,):
                spec = base | {"kind": "scaling", "arch": "gelu", "workload": asdict(workload),
                               "gradient_checkpointing": checkpointing}  # fmt: skip
                result = _run_subprocess(spec, args.timeout)
                raw["scaling"].append({"workload": workload.name, "checkpointing": checkpointing, "result": result})
                if "error" in result:
                    line = f"| {workload.name} | {workload.num_inputs:,} | {checkpointing} | {result['error']} | | |"
                else:
                    peak = result["train_peak_bytes"]
                    line = (f"| {workload.name} | {workload.num_inputs:,} | {'yes' if checkpointing else 'no'} "
                            f"| {_seconds(result['train_s'])} | {_mb(peak)} "
                            f"| {'yes' if peak <= MEMORY_BUDGET_BYTES else 'no'} |")  # fmt: skip
                extra.append(line)
                print(line, flush=True)
        # Linear growth: the extra memory per extra input position, between the two sizes of each input kind.
        plain = {r["workload"]: r["result"] for r in raw["scaling"] if not r["checkpointing"]}
        growth = []
        for small, large in zip(cases[0::2], cases[1::2], strict=True):
            a, b = plain.get(small.name, {}), plain.get(large.name, {})
            if "train_peak_bytes" in a and "train_peak_bytes" in b:
                per_input = (b["train_peak_bytes"] - a["train_peak_bytes"]) / (large.num_inputs - small.num_inputs)
                growth.append(
                    f"{small.name} -> {large.name}: x{large.num_inputs / small.num_inputs:.0f} inputs, "
                    f"x{b['train_peak_bytes'] / a['train_peak_bytes']:.1f} peak memory, "
                    f"{per_input / 1024:.1f} KiB per extra input position"
                )
        if growth:
            extra += ["", "Growth: " + "; ".join(growth) + "."]

    if not (args.skip_compile or args.quick):  # compiling takes minutes on 2 shared cores
        extra += ["", "## torch.compile(fullgraph=True) of the encoder, inference (ours)", "",
                  "Default inductor settings, and with `torch._inductor.config.freezing = True` (weights as "
                  "constants, an inference-only option). Eager and compiled calls alternate.", "",
                  "| input | eager | compiled | compiled/eager | compiled, freezing | freezing/eager | compile time "
                  "| max abs diff |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        raw["compile"] = []
        compile_workloads = {k: w for k, w in workloads.items() if k in COMPILE_WORKLOADS} or workloads
        for wname, workload in compile_workloads.items():
            spec = base | {"kind": "compile", "arch": "gelu", "workload": asdict(workload), "repeats": args.repeats}
            result = _run_subprocess(spec, args.timeout)
            raw["compile"].append({"workload": wname, "result": result})
            if "error" in result:
                line = f"| {wname} | {result['error']} | | | | | | |"
            else:
                eager = result["eager_s"]
                line = (f"| {wname} | {_seconds(eager)} | {_seconds(result['compiled_s'])} "
                        f"| {result['compiled_s'] / eager:.2f} | {_seconds(result['compiled_freezing_s'])} "
                        f"| {result['compiled_freezing_s'] / eager:.2f} "
                        f"| {' / '.join(f'{t:.0f} s' for t in result['compile_s'].values())} "
                        f"| {result['max_abs_diff']:.1e} |")  # fmt: skip
            extra.append(line)
            print(line, flush=True)

    for p, rate in _matmul_rates(base).items():
        matmul[p].append(rate)
    elapsed = time.time() - started

    workload_rates = [
        f"{p}: " + ", ".join(f"{k} {v[p]:.0f}" for k, v in matmul_by_workload.items() if p in v) for p in precisions
    ]
    command = "python benchmarks/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    report = [
        "# Benchmark results",
        "",
        f"Command: `{command}` ({elapsed / 60:.0f} min, {time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"Hardware: {hardware['cpu']}, {hardware['cores']} cores, {args.threads} torch threads, "
        f"{' and '.join(precisions)}; load average "
        f"at start {hardware['load_average'][0]:.1f} (the machine is shared, so absolute times are noisy; the "
        "ratios come from runs taken side by side). "
        + "; ".join(f"{p} matmul 2048x2048: {' / '.join(f'{m:.0f}' for m in matmul[p])} GFLOP/s" for p in PRECISIONS)
        + f" at the start / end (CPU bf16 flags: {', '.join(hardware['bf16_flags']) or 'none'}); the FLOP "
        "utilisation of a workload uses the best rate of its precision sampled between its steps ("
        + "; ".join(workload_rates)
        + " GFLOP/s).",
        "",
        f"Precision: {precision_note} bf16 rows run each library's inference and training step under "
        '`torch.autocast("cpu", dtype=torch.bfloat16)`, weights, gradients and optimizer state in fp32 (mixed '
        "precision as Accelerate and the Trainer do it), on the same batches as the fp32 rows.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        "",
        "Architectures: " + "; ".join(f"`{k}` = {a.describe()}" for k, a in architectures.items()),
        "",
        "Workloads: " + "; ".join(f"`{k}` = {w.describe()}" for k, w in workloads.items()),
        "",
        "Times are the best of the rounds (other processes only ever add time); peak MB is the process's "
        "peak RSS above its RSS before the model was built. "
        "FLOP utilisation = executed FLOPs of a training step / step time / matmul rate of the row's precision "
        "(bf16 rows: the bf16 rate; FLOPs are counted alike in both precisions). "
        "`ours/peer` < 1: ours is faster or smaller, against the peer's row of the same precision.",
        "",
        *_table(rows, matmul_by_workload),
        "",
        f"Targets (ours/peer over every peer; training time <= {TARGET_TRAIN_RATIO}, memory <= 1.0):",
        "",
        *_targets(rows),
        *_bf16_against_fp32(rows),
        *extra,
    ]
    notes = sorted({f"{r['library']}: {note}" for r in rows for note in r["result"].get("notes", [])})
    if notes:
        report += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    text = "\n".join(report) + "\n"
    print()
    print(text)
    output = args.output or (None if args.quick else HERE / "RESULTS.md")
    if output:
        output.write_text(text)
        print(f"wrote {output}")
    if args.json:
        raw |= {"matmul_gflops": matmul, "matmul_by_workload": matmul_by_workload, "hardware": hardware,
                "precisions": precisions, "precision_note": precision_note}  # fmt: skip
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
