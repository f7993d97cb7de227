"""Perceiver AR: perceiver_hf's `PerceiverARForCausalLM` against krasserm's `CausalLanguageModel` (perceiver-io 0.11).

    python benchmarks/perceiver_ar.py --threads 1            # full run (~15 min on 1 thread)
    python benchmarks/perceiver_ar.py --threads 1 --quick    # smoke run: small sizes

Measured side by side in one run, at matched size (krasserm built without absolute position embeddings, rotary
in every self-attention layer, an output norm and no output bias, as ours; its MLPs have no biases, ours do):

- training step (forward, backward, AdamW) of a long context, both models in the same process, alternating;
- greedy generation speed in tokens per second, with and without the key/value cache: ours through
  `model.generate()` (transformers' GenerationMixin), krasserm's through a plain loop over its backend model (its
  Hugging Face wrapper needs transformers 4), both starting with one latent at the end of the prompt;
- peak memory (RSS of a fresh subprocess) of a training step of a 16k-token context at batch 1.

Install krasserm's package as benchmarks/README.md says; without it only our numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sizes(quick: bool) -> dict:
    if quick:
        return {
            "train": dict(context=512, latents=128, hidden=128, heads=4, layers=2, batch=2),
            "generate": dict(prompt=256, new=16, latents=128, hidden=128, heads=4, layers=2),
            "memory": dict(context=2048, latents=256, hidden=128, heads=4, layers=2, batch=1),
        }
    return {
        "train": dict(context=4096, latents=512, hidden=512, heads=8, layers=6, batch=1),
        "generate": dict(prompt=1024, new=64, latents=256, hidden=512, heads=8, layers=6),
        "memory": dict(context=16384, latents=1024, hidden=512, heads=8, layers=6, batch=1),
    }


def build(library: str, context: int, latents: int, hidden: int, heads: int, layers: int, **_):
    torch.manual_seed(0)
    if library == "ours":
        from perceiver_hf import PerceiverARConfig, PerceiverARForCausalLM

        config = PerceiverARConfig(
            vocab_size=262,
            max_position_embeddings=context,
            num_latents=latents,
            hidden_size=hidden,
            num_self_attention_layers=layers,
            num_cross_attention_heads=heads,
            num_self_attention_heads=heads,
            prefix_dropout=0.5,
        )
        return PerceiverARForCausalLM(config)
    from bench_krasserm import _backend

    clm = _backend("perceiver.model.text.clm", "perceiver.model.text")
    config = clm.CausalLanguageModelConfig(
        vocab_size=262,
        max_seq_len=context,
        max_latents=latents,
        num_channels=hidden,
        num_heads=heads,
        num_self_attention_layers=layers,
        num_self_attention_rotary_layers=layers,
        cross_attention_dropout=0.5,
        abs_pos_emb=False,
        output_norm=True,
        output_bias=False,
    )
    return clm.CausalLanguageModel(config)


def train_step_fn(library: str, model, context: int, latents: int, batch: int, **_):
    """One training step on random tokens: ours with `labels`, krasserm's with the same shifted loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 262, (batch, context))
    model.train()

    def step() -> None:
        if library == "ours":
            loss = model(ids, labels=ids).loss
        else:
            logits = model(ids, prefix_len=context - latents).logits  # (B, latents, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, -latents + 1 :].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def generate_fn(library: str, model, prompt: int, new: int, use_cache: bool, **_):
    ids = torch.randint(0, 262, (1, prompt))
    model.eval()
    if library == "ours":

        def run() -> torch.Tensor:
            return model.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache, num_latents=1
            )

        return run

    def run() -> torch.Tensor:
        # krasserm's schedule: prefix = prompt minus one latent; each new token adds a latent (while they fit).
        prefix_len = prompt - 1
        seq, cache = ids, [] if use_cache else None
        x = ids
        for _ in range(new):
            out = model(x, prefix_len=prefix_len, kv_cache=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
            if use_cache:
                cache, x = out.kv_cache, token
            else:
                x = seq
        return seq

    return run


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def memory_worker(library: str, settings: dict) -> dict:
    """Run in a fresh process: build the model, then two training steps; return the process's peak RSS (all of
    it: Python, torch, weights, AdamW state and activations) and the faster step."""
    model = build(library, **settings)
    step = train_step_fn(library, model, **settings)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak, "step_s": min(first, second)}


def krasserm_available() -> str | None:
    try:
        from bench_krasserm import _backend

        _backend("perceiver.model.text.clm", "perceiver.model.text")
    except ImportError as error:
        return str(error)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement (best is reported)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("LIBRARY", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], json.loads(args.memory_worker[1]))))
        return

    plan = sizes(args.quick)
    missing = krasserm_available()
    libraries = ["ours"] if missing else ["ours", "krasserm"]
    if missing:
        print(f"krasserm's perceiver-io is not importable ({missing}); see benchmarks/README.md")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(f"# Perceiver AR benchmark\n\nProcessor: {model_name} ({platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, fp32\n")  # fmt: skip
    rows = []

    # Training step, alternating between the libraries.
    s = plan["train"]
    models = {lib: build(lib, **s) for lib in libraries}
    params = {lib: sum(p.numel() for p in m.parameters()) for lib, m in models.items()}
    steps = {lib: train_step_fn(lib, models[lib], **s) for lib in libraries}
    for lib in libraries:
        steps[lib]()  # warm-up
    times = {lib: [] for lib in libraries}
    for _ in range(args.repeats):
        for lib in libraries:
            times[lib] += timed(steps[lib], 1)
    tokens = s["batch"] * s["context"]
    desc = f"train step, context {s['context']}, {s['latents']} latents, batch {s['batch']}"
    for lib in libraries:
        best = min(times[lib])
        rows.append(
            (desc, lib, f"{params[lib] / 1e6:.2f} M", f"{best * 1e3:,.0f} ms", f"{tokens / best:,.0f} tokens/s")
        )
    del models, steps

    # Generation with and without the cache.
    g = plan["generate"]
    models = {lib: build(lib, context=g["prompt"] + g["latents"], **g) for lib in libraries}
    for use_cache in (True, False):
        runs = {lib: generate_fn(lib, models[lib], use_cache=use_cache, **g) for lib in libraries}
        for lib in libraries:
            runs[lib]()  # warm-up
        gen_times = {lib: [] for lib in libraries}
        for _ in range(args.repeats):
            for lib in libraries:
                gen_times[lib] += timed(runs[lib], 1)
        desc = f"greedy generation, prompt {g['prompt']}, {g['new']} new tokens, {'with' if use_cache else 'no'} cache"
        for lib in libraries:
            best = min(gen_times[lib])
            params_g = sum(p.numel() for p in models[lib].parameters())
            rows.append((desc, lib, f"{params_g / 1e6:.2f} M", f"{best:.2f} s", f"{g['new'] / best:,.1f} tokens/s"))
    del models

    # Peak memory of a long-context training step, one fresh process per library.
    m = plan["memory"]
    desc = f"train step, context {m['context']}, {m['latents']} latents, batch 1: peak RSS"
    for lib in libraries:
        command = [sys.executable, __file__, "--memory-worker", lib, json.dumps(m)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        result = json.loads(out)
        rows.append((desc, lib, "", f"{result['step_s'] * 1e3:,.0f} ms", f"{result['peak_bytes'] / 2**30:.2f} GiB"))

    print("| measurement | library | params | time | rate / memory |")
    print("|---|---|--:|--:|--:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
