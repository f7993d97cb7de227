"""Data-parallel training with Accelerate (issue 8): a 2-process gloo run of ``examples/run_mlm.py`` on CPU
evaluates exactly as one process evaluating the saved model on the same data.

Why the launch command is ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``: in
accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts a *single* process (its "simple"
launcher; several CPU processes need ``mpirun`` and a hostfile), which would make this test vacuous. With
``--multi_gpu`` Accelerate starts the processes with torchrun, and ``ACCELERATE_USE_CPU`` makes each of
them take the MULTI_CPU (gloo) path. The test checks that two processes really ran.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

EXAMPLES_DIR = REPO_ROOT / "examples"
SCRIPT = EXAMPLES_DIR / "run_mlm.py"


def import_example(name: str):
    """Import an example script as a module (the scripts import their shared helpers as `common`)."""
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES_DIR))


run_mlm = import_example("run_mlm")
common = import_example("common")

EVAL_SAMPLES, EVAL_BATCH_SIZE, MAX_SEQ_LEN = 16, 4, 32
# A tiny model trained for a few steps on the shipped IMDb sample. The evaluation set is a multiple of
# eval_batch_size x 2 processes: Accelerate then deals whole batches and pads nothing (see README).
TINY_RUN = [
    "--vocab_size", "300", "--max_seq_len", str(MAX_SEQ_LEN), "--num_latents", "8", "--d_latents", "16",
    "--d_model", "16", "--num_self_attention_layers_per_block", "1", "--num_cross_attention_heads", "2",
    "--num_self_attention_heads", "2", "--num_decoder_heads", "2", "--batch_size", "4",
    "--eval_batch_size", str(EVAL_BATCH_SIZE), "--max_train_samples", "64", "--max_eval_samples", str(EVAL_SAMPLES),
    "--max_steps", "4", "--learning_rate", "5e-3", "--lr_scheduler", "constant", "--logging_steps", "1",
    "--checkpointing_steps", "4",
    # One block per text, so that the validation blocks split evenly over the processes and batches (grouped blocks
    # need not, and the repeated examples that even out the last batch would enter the loss's mean).
    "--line_by_line",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def single_process_evaluation(model_dir: Path) -> dict[str, float]:
    """Evaluate the saved model and tokenizer in this process, with a plain loop (no Accelerate).

    The validation data and masks are what one process of run_mlm.py sees: the same split and subset,
    the same tokenization, and batch k masked under `BatchSeededCollator`'s seed for (seed + 1, 0, k).
    """
    args = run_mlm.parse_cli(
        ["--max_eval_samples", str(EVAL_SAMPLES), "--max_seq_len", str(MAX_SEQ_LEN), "--output_dir", str(model_dir)]
    )
    raw = common.load_raw_datasets(args, default_data_files=run_mlm.SAMPLE_DATA_FILES, hub_splits=run_mlm.HUB_SPLITS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    validation = raw["validation"].map(
        lambda batch: tokenizer(
            batch["text"], truncation=True, max_length=MAX_SEQ_LEN, return_special_tokens_mask=True
        ),
        batched=True,
        remove_columns=raw["validation"].column_names,
    )
    masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability, pad_to_multiple_of=8)
    collate = common.BatchSeededCollator(masking, args.seed + 1)
    loss_sum, num_examples, correct, masked = 0.0, 0, 0, 0
    for start in range(0, len(validation), EVAL_BATCH_SIZE):
        batch = collate([validation[i] for i in range(start, min(start + EVAL_BATCH_SIZE, len(validation)))])
        with torch.no_grad():
            outputs = model(**batch)
        size = batch["input_ids"].shape[0]
        loss_sum += outputs.loss.item() * size  # run_mlm.py weights each batch's loss by its examples
        num_examples += size
        labelled = batch["labels"] != -100
        correct += (outputs.logits.argmax(dim=-1)[labelled] == batch["labels"][labelled]).sum().item()
        masked += labelled.sum().item()
    return {"loss": loss_sum / num_examples, "accuracy": correct / masked, "masked_tokens": masked}


def test_two_process_gloo_run_evaluates_like_one_process(tmp_path: Path) -> None:
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(SCRIPT), *TINY_RUN, "--output_dir", str(output_dir),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command, env={**script_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, f"accelerate launch failed after {elapsed:.0f} s:\n{result.stderr[-4000:]}"
    assert elapsed < 180, f"the 2-process run took {elapsed:.0f} s"

    # Two gloo processes really trained: both logged their state, and both saved their RNG state.
    log = result.stdout + result.stderr
    assert "DistributedType.MULTI_CPU" in log and "Backend: gloo" in log
    assert "x 2 processes" in log
    checkpoint = output_dir / "checkpoints" / "step_4"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    gathered = json.loads((output_dir / "eval_results.json").read_text())
    reference = single_process_evaluation(output_dir)
    assert reference["masked_tokens"] > 0
    # Different masks (process-local seeds) or a different tokenizer per process (tokenizers' WordPiece
    # training is not deterministic) shift the loss by about 1e-5 relative here: far above this tolerance.
    assert gathered["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=0)
    assert gathered["accuracy"] == pytest.approx(reference["accuracy"], rel=0, abs=1e-12)
    assert gathered["perplexity"] == pytest.approx(math.exp(reference["loss"]), rel=1e-6)


def test_batch_seeded_collator_seeds_by_global_batch_index() -> None:
    """Local batch k of process p is masked as global batch k * num_processes + p of one process."""
    draws = common.BatchSeededCollator(lambda features: torch.rand(3), seed=7)
    single = [draws([{}]) for _ in range(4)]  # global batches 0, 1, 2, 3
    for process_index in range(2):
        draws.set_epoch(0)
        draws.set_process(process_index, 2)
        local = [draws([{}]) for _ in range(2)]
        assert torch.equal(local[0], single[process_index]) and torch.equal(local[1], single[2 + process_index])
    draws.set_epoch(0, start_batch=1)  # a resumed process 1 that already used its first batch
    assert torch.equal(draws([{}]), single[3])
    with pytest.raises(ValueError, match=r"process_index \(2\) must be in \[0, num_processes=2\)"):
        draws.set_process(2, 2)
