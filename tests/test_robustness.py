"""Robustness under faults and bad input (issue 8).

Faults: a training run killed with SIGKILL and resumed with ``--resume_from_checkpoint latest`` continues
with exactly the losses of an uninterrupted run; a checkpoint interrupted while being written is never
picked up; damaged, incomplete or malicious checkpoint files fail with an error naming them, and nothing
is unpickled beyond plain tensors and numbers.

Bad input: every public entry point (model forwards, building blocks, configurations, `from_pretrained`,
the example scripts' command lines) rejects wrong ranks, shapes, channel counts, dtypes, ids, sizes,
tokenizers that do not fit the model and missing files with a `ValueError` (argparse: exit status 2) that
names the argument, the value and what was expected, before any work or any write.

Everything runs offline on tiny models (hidden size 16) and the IMDb sample shipped in ``examples/data``.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import REPO_ROOT
from perceiver_tester import tiny_image_config, tiny_text_config
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer

from perceiver_hf import (
    ClassificationOutputAdapter,
    ImageInputAdapter,
    PerceiverAttention,
    PerceiverConfig,
    PerceiverCrossAttentionLayer,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverSelfAttentionLayer,
    TextInputAdapter,
    TextOutputAdapter,
    train_wordpiece_tokenizer,
)

EXAMPLES_DIR = REPO_ROOT / "examples"
MLM_SCRIPT = EXAMPLES_DIR / "run_mlm.py"
MAX_SEQ_LEN = 32


def import_example(name: str) -> ModuleType:
    """Import an example script as a module (the scripts import their shared helpers as `common`)."""
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES_DIR))


run_mlm = import_example("run_mlm")
common = import_example("common")


def script_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, imdb_texts: list[str]) -> Path:
    """A 300-token WordPiece tokenizer saved once. Runs compared step by step share it: tokenizers' WordPiece
    training is not deterministic (huggingface/tokenizers#1794), so two runs that each train their own
    tokenizer on the same texts may tokenize differently."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece_tokenizer(imdb_texts, vocab_size=300, model_max_length=MAX_SEQ_LEN).save_pretrained(path)
    return path


@pytest.fixture
def accelerator():
    """A single-process CPU `Accelerator`; its global state is reset afterwards so other tests start clean."""
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------------------------------
# Faults: SIGKILL and exact resume, half-written and damaged checkpoints
# --------------------------------------------------------------------------------------------------


def read_losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"{path}: steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_run_killed_with_sigkill_resumes_with_the_uninterrupted_losses(tmp_path: Path, tokenizer_dir: Path) -> None:
    max_steps, every = 30, 5
    run = [
        sys.executable, str(MLM_SCRIPT), "--tokenizer_name", str(tokenizer_dir), "--max_seq_len", str(MAX_SEQ_LEN),
        "--num_latents", "8", "--d_latents", "16", "--d_model", "16", "--num_self_attention_layers_per_block", "1",
        "--num_cross_attention_heads", "2", "--num_self_attention_heads", "2", "--num_decoder_heads", "2",
        "--batch_size", "4", "--max_train_samples", "64", "--max_eval_samples", "8", "--max_steps", str(max_steps),
        "--checkpointing_steps", str(every), "--logging_steps", "1", "--learning_rate", "3e-3", "--dropout", "0.1",
    ]  # fmt: skip

    def start(output_dir: Path, name: str, *extra: str) -> subprocess.Popen:
        command = [*run, "--output_dir", str(output_dir), "--loss_log_file", str(tmp_path / f"{name}.jsonl"), *extra]
        # Output to a file, not a pipe (a full pipe would block the run); the child keeps its own handle.
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen(command, env=script_env(), stdout=log, stderr=subprocess.STDOUT)

    def finish(process: subprocess.Popen, name: str) -> None:
        assert process.wait(timeout=300) == 0, f"{name} failed:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"

    reference_dir, victim_dir = tmp_path / "reference", tmp_path / "victim"
    reference = start(reference_dir, "reference")  # both at once: two cores, half the waiting
    victim = start(victim_dir, "victim")

    # Kill the victim as soon as its first checkpoint exists (it appears at once, complete, by a rename).
    first_checkpoint = victim_dir / "checkpoints" / f"step_{every}"
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_dir():
        assert victim.poll() is None, (
            f"the run ended before its first checkpoint:\n{(tmp_path / 'victim.log').read_text()}"
        )
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (victim_dir / "model.safetensors").exists(), "the run had already finished: nothing was interrupted"
    finish(reference, "reference")

    # A temporary folder left by a write that was killed must never be taken for a checkpoint.
    leftover = victim_dir / "checkpoints" / f".partial_step_{10 * max_steps}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\x00" * 7)
    finish(start(victim_dir, "resumed", "--resume_from_checkpoint", "latest"), "resumed")

    expected = read_losses(tmp_path / "reference.jsonl")
    before_kill = read_losses(tmp_path / "victim.jsonl")
    after_resume = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(expected) == list(range(1, max_steps + 1))
    # Same seed, same data, CPU: the same loss trajectory, bit for bit, in two separate processes.
    assert len(before_kill) >= every and before_kill == {step: expected[step] for step in before_kill}
    # The resumed run starts after the latest checkpoint written before the kill and repeats its losses.
    resumed_from = min(after_resume) - 1
    assert resumed_from % every == 0 and every <= resumed_from <= max(before_kill)
    assert sorted(after_resume) == list(range(resumed_from + 1, max_steps + 1))
    assert after_resume == {step: expected[step] for step in after_resume}
    # ... and ends with the same weights and the same evaluation.
    reference_weights, resumed_weights = (load_file(d / "model.safetensors") for d in (reference_dir, victim_dir))
    assert reference_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)
    assert json.loads((victim_dir / "eval_results.json").read_text()) == json.loads(
        (reference_dir / "eval_results.json").read_text()
    )


def _prepared(
    accelerator: Accelerator,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return accelerator.prepare(model, optimizer, scheduler)


def test_a_save_killed_midway_leaves_no_checkpoint(tmp_path: Path, accelerator: Accelerator, monkeypatch) -> None:
    _prepared(accelerator)
    checkpoints = tmp_path / common.CHECKPOINTS_SUBDIR
    first = common.save_checkpoint(accelerator, tmp_path, 2)
    assert first == checkpoints / "step_2"

    def dies_while_writing(output_dir: str, **kwargs) -> None:
        (Path(output_dir) / "model.safetensors").write_bytes(b"\x00" * 10)  # a truncated file, then the "kill"
        raise RuntimeError("killed while writing the checkpoint")

    monkeypatch.setattr(accelerator, "save_state", dies_while_writing)
    with pytest.raises(RuntimeError, match="killed while writing"):
        common.save_checkpoint(accelerator, tmp_path, 4)
    assert not (checkpoints / "step_4").exists() and (checkpoints / ".partial_step_4").is_dir()
    assert common.find_checkpoint("latest", tmp_path) == first

    monkeypatch.undo()  # the restarted run saves step 4 again: the leftover is replaced, not kept
    assert common.save_checkpoint(accelerator, tmp_path, 4) == checkpoints / "step_4"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4"]
    assert common.find_checkpoint("latest", tmp_path) == checkpoints / "step_4"


def _damage(checkpoint: Path, case: str, marker: Path) -> None:
    """Damage a copy of a good checkpoint the way a crash, a bad disk or an attacker would."""

    class Payload:
        def __reduce__(self):  # unpickling it would create `marker`: arbitrary code execution
            return (os.mkdir, (str(marker),))

    if case == "no RNG state":
        (checkpoint / "random_states_0.pkl").unlink()
    elif case == "truncated RNG state":
        (checkpoint / "random_states_0.pkl").write_bytes((checkpoint / "random_states_0.pkl").read_bytes()[:40])
    elif case == "pickled code in RNG state":
        torch.save({"random_state": Payload()}, checkpoint / "random_states_0.pkl")
    elif case == "no weights":
        (checkpoint / "model.safetensors").unlink()
    elif case == "truncated weights":
        (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:100])
    elif case == "truncated optimizer":
        (checkpoint / "optimizer.bin").write_bytes((checkpoint / "optimizer.bin").read_bytes()[:100])
    elif case == "pickled code in optimizer":
        torch.save({"state": {}, "param_groups": [Payload()]}, checkpoint / "optimizer.bin")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no RNG state", r"has no random_states_0\.pkl: it is incomplete"),
        ("truncated RNG state", r"random_states_0\.pkl is unreadable \(truncated or tampered\?\)"),
        ("pickled code in RNG state", r"random_states_0\.pkl is unreadable .*Weights only load failed"),
        ("no weights", r"has no model weights \(model\.safetensors\): it is incomplete"),
        ("truncated weights", r"could not be loaded \(truncated or tampered file\?\).*deserializing header"),
        ("truncated optimizer", r"could not be loaded \(truncated or tampered file\?\)"),
        ("pickled code in optimizer", r"could not be loaded .*Weights only load failed"),
    ],
)
def test_damaged_checkpoint_fails_naming_it(tmp_path: Path, accelerator: Accelerator, case: str, message: str) -> None:
    _prepared(accelerator)
    good = common.save_checkpoint(accelerator, tmp_path / "run", 3)
    damaged = tmp_path / "copy" / "step_3"
    shutil.copytree(good, damaged)
    marker = tmp_path / "payload-ran"
    _damage(damaged, case, marker)

    with pytest.raises(ValueError, match=message) as error:
        # find_checkpoint checks the files before the script loads data or builds the model; load_checkpoint
        # is reached only by damage that the quick check cannot see.
        common.find_checkpoint(str(damaged), tmp_path)
        common.load_checkpoint(accelerator, damaged, steps_per_epoch=10, gradient_accumulation_steps=1)
    assert str(damaged) in str(error.value)
    assert not marker.exists(), "a pickled payload was executed"
    # The undamaged checkpoint still loads.
    assert (
        common.load_checkpoint(accelerator, good, steps_per_epoch=10, gradient_accumulation_steps=1).completed_steps
        == 3
    )


# --------------------------------------------------------------------------------------------------
# Safe loading of saved models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mlm")
    PerceiverForMaskedLM(tiny_text_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: data[: len(data) // 2], "incomplete metadata, file not fully covered"),
        (lambda data: data[:5], "header too small"),
        (lambda data: data[:20] + bytes([data[20] ^ 0xFF]) + data[21:], "invalid UTF-8 in header"),
        (lambda data: data[:8] + b"X" + data[9:], "invalid JSON in header"),
        (lambda data: (2**40).to_bytes(8, "little") + data[8:], "header too large"),
    ],
    ids=[
        "truncated to half",
        "truncated to 5 bytes",
        "flipped byte in header",
        "header not JSON",
        "huge header length",
    ],
)
def test_tampered_or_truncated_safetensors_fail_from_pretrained_clearly(
    saved_mlm: Path, tmp_path: Path, damage: Callable[[bytes], bytes], reason: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(saved_mlm, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(OSError) as error:
        AutoModelForMaskedLM.from_pretrained(copy)
    assert f"cannot load the weights of {str(copy)!r}: a safetensors file there is truncated or corrupted" in str(
        error.value
    )
    assert reason in str(error.value)


def test_missing_weights_or_config_fail_from_pretrained_clearly(saved_mlm: Path, tmp_path: Path) -> None:
    no_weights = tmp_path / "no-weights"
    shutil.copytree(saved_mlm, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForMaskedLM.from_pretrained(no_weights)

    bad_config = tmp_path / "bad-config"
    shutil.copytree(saved_mlm, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "num_latents": 0}))
    with pytest.raises(ValueError, match=r"num_latents \(0\) must be a positive integer"):
        AutoModelForMaskedLM.from_pretrained(bad_config)


def test_pickled_weights_are_never_executed(saved_mlm: Path, tmp_path: Path) -> None:
    """A `pytorch_model.bin` that would run code when unpickled is refused (torch.load with weights_only)."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(saved_mlm / "config.json", folder)
    torch.save({"perceiver.encoder.latent": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AutoModelForMaskedLM.from_pretrained(folder)
    assert not marker.exists(), "from_pretrained executed a pickled payload"


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


def _losses_of_a_short_run(seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = PerceiverForMaskedLM(tiny_text_config(dropout=0.1, attention_dropout=0.1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(5, 41, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) < 0.3, input_ids, -100)
    losses = []
    for _ in range(4):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_same_seed_gives_the_same_loss_trajectory() -> None:
    first, second = _losses_of_a_short_run(3), _losses_of_a_short_run(3)
    assert first == second
    assert _losses_of_a_short_run(4) != first  # the seed matters: initialisation and dropout are random


# --------------------------------------------------------------------------------------------------
# Bad input to models, building blocks and configurations
# --------------------------------------------------------------------------------------------------

TEXT, IMAGE = tiny_text_config(), tiny_image_config()
MLM = PerceiverForMaskedLM(TEXT).eval()
TEXT_CLASSIFIER = PerceiverForSequenceClassification(TEXT).eval()
IMAGE_CLASSIFIER = PerceiverForImageClassification(IMAGE).eval()
IDS = torch.randint(5, TEXT.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1))
BLOCKS = PerceiverConfig(
    vocab_size=10, max_position_embeddings=8, d_model=16, num_latents=4, d_latents=16,
    num_self_attention_layers_per_block=1, num_self_attention_heads=2,
)  # fmt: skip
ENCODER = PerceiverEncoder(BLOCKS, TextInputAdapter(10, 8, 16))
DECODER = PerceiverDecoder(BLOCKS, ClassificationOutputAdapter(3, num_output_channels=16), use_query_residual=True)

BAD_INPUTS: dict[str, tuple[Callable[[], object], str]] = {
    # --- text models: rank, dtype, length, ids, empty batches, labels
    "1-d input_ids": (lambda: MLM(input_ids=IDS[0]), r"input_ids must have shape \(batch, sequence\), got \(8,\)"),
    "3-d input_ids": (
        lambda: MLM(input_ids=IDS[None]),
        r"input_ids must have shape \(batch, sequence\), got \(1, 2, 8\)",
    ),
    "float input_ids": (
        lambda: MLM(input_ids=IDS.float()),
        r"input_ids must hold integer token ids, got dtype torch\.float32",
    ),
    "bool input_ids": (lambda: MLM(input_ids=IDS.bool()), "got dtype torch.bool"),
    "too long for the positions": (
        lambda: MLM(input_ids=torch.randint(5, 41, (2, TEXT.max_position_embeddings + 1))),
        r"input_ids has length 13, longer than the model's 12 positions \(max_position_embeddings\)",
    ),
    "id beyond the vocabulary": (
        lambda: MLM(input_ids=torch.full((2, 4), TEXT.vocab_size)),
        r"input_ids must be token ids in \[0, vocab_size=41\), got ids from 41 to 41; is the tokenizer the model's own",
    ),
    "negative id": (
        lambda: TEXT_CLASSIFIER(input_ids=IDS - TEXT.vocab_size),  # every id negative
        r"input_ids must be token ids in \[0, vocab_size=41\)",
    ),
    "empty batch": (lambda: MLM(input_ids=IDS[:0]), r"at least one example and one position, got shape \(0, 8, 16\)"),
    "empty sequences": (lambda: TEXT_CLASSIFIER(input_ids=IDS[:, :0]), r"at least one example and one position"),
    "attention_mask of another shape": (
        lambda: MLM(input_ids=IDS, attention_mask=torch.ones(2, 7)),
        r"attention_mask must have shape \(batch, positions\) = \(2, 8\), got \(2, 7\)",
    ),
    "attention_mask without any position": (
        lambda: MLM(input_ids=IDS, attention_mask=torch.zeros(2, 8)),
        r"attention_mask rows \[0, 1\] mask out every input position",
    ),
    "MLM labels of another shape": (
        lambda: MLM(input_ids=IDS, labels=IDS[:, :4]),
        r"labels must have the shape of input_ids \(2, 8\), got \(2, 4\)",
    ),
    "MLM labels beyond the vocabulary": (
        lambda: MLM(input_ids=IDS, labels=torch.full_like(IDS, 99)),
        r"labels must be ids in \[0, vocab_size=41\) or -100 \(no loss\), got \[99,",
    ),
    "float MLM labels": (
        lambda: MLM(input_ids=IDS, labels=IDS.float()),
        "labels must hold integer ids .* torch.float32",
    ),
    "class id beyond num_labels": (
        lambda: TEXT_CLASSIFIER(input_ids=IDS, labels=torch.tensor([0, 3])),
        r"labels must be ids in \[0, num_labels=3\) or -100 \(no loss\), got \[3\]",
    ),
    "negative class id": (lambda: TEXT_CLASSIFIER(input_ids=IDS, labels=torch.tensor([-1, 0])), r"got \[-1\]"),
    "no input": (lambda: MLM(), "input_ids is required"),
    "pixels for a text model": (
        lambda: TEXT_CLASSIFIER.perceiver(pixel_values=PIXELS),
        r"input_ids must have shape \(batch, sequence\), got \(2, 3, 6, 5\)",
    ),
    # --- image models: rank, channels, dtype, empty
    "3-d images": (
        lambda: IMAGE_CLASSIFIER(pixel_values=PIXELS[0]),
        r"images must have shape \(batch, height, width, 3\)",
    ),
    "1-channel images for a 3-channel model": (
        lambda: IMAGE_CLASSIFIER(pixel_values=torch.randn(2, 1, 6, 5)),
        r"images of shape \(2, 1, 6, 5\) have no axis of 3 channels at position 1 or -1",
    ),
    "integer pixel values": (
        lambda: IMAGE_CLASSIFIER(pixel_values=(PIXELS * 100).to(torch.uint8)),
        r"images must be a floating point tensor, got dtype torch\.uint8",
    ),
    "empty image batch": (
        lambda: IMAGE_CLASSIFIER(pixel_values=PIXELS[:0]),
        r"images must hold at least one image of at least 1x1 pixels, got shape \(0, 3, 6, 5\)",
    ),
    "zero-height images": (lambda: IMAGE_CLASSIFIER(pixel_values=torch.randn(2, 3, 0, 5)), "at least 1x1 pixels"),
    "token ids for an image model": (
        lambda: IMAGE_CLASSIFIER(pixel_values=IDS),
        r"images must have shape \(batch, height, width, 3\) or \(batch, 3, height, width\), got \(2, 8\)",
    ),
    # --- building blocks
    "config with 0 heads": (
        lambda: PerceiverConfig(num_self_attention_heads=0),
        r"num_self_attention_heads \(0\) must be a positive integer",
    ),
    "config with negative heads": (
        lambda: PerceiverConfig(num_cross_attention_heads=-2),
        r"num_cross_attention_heads \(-2\) must be a positive",
    ),
    "attention dropout 1.5": (
        lambda: PerceiverConfig(attention_dropout=1.5),
        r"attention_dropout \(1\.5\) must be a float in \[0, 1\)",
    ),
    "attention queries of the wrong width": (
        lambda: PerceiverAttention(BLOCKS, 2, 16, 8)(torch.randn(1, 3, 15), torch.randn(1, 4, 8)),
        r"x_q must have shape \(batch, positions, 16\), got \(1, 3, 15\)",
    ),
    "attention keys of another batch": (
        lambda: PerceiverAttention(BLOCKS, 2, 16, 8)(torch.randn(2, 3, 16), torch.randn(1, 4, 8)),
        "x_kv must hold 2 examples, as the other input does, got 1",
    ),
    "cross-attention inputs of the wrong width": (
        lambda: PerceiverCrossAttentionLayer(BLOCKS, 2, 16, 8)(torch.randn(1, 3, 16), torch.randn(1, 4, 9)),
        r"x_kv must have shape \(batch, positions, 8\), got \(1, 4, 9\)",
    ),
    "self-attention input of rank 2": (
        lambda: PerceiverSelfAttentionLayer(BLOCKS)(torch.randn(3, 16)),
        r"x must have shape \(batch, positions, 16\), got \(3, 16\)",
    ),
    "config with 0 latents": (
        lambda: PerceiverConfig(num_latents=0),
        r"num_latents \(0\) must be a positive integer",
    ),
    "config with 0 layers per block": (
        lambda: PerceiverConfig(num_self_attention_layers_per_block=0),
        r"num_self_attention_layers_per_block \(0\) must be a positive integer",
    ),
    "adapter setting of another adapter": (
        lambda: PerceiverConfig(input_adapter="text", input_adapter_config={"image_size": [4, 4]}),
        r"input_adapter_config has settings \['image_size'\] that input_adapter='text' does not use",
    ),
    "input adapter of another name": (
        lambda: PerceiverConfig(input_adapter="video"),
        r"input_adapter \('video'\) must be one of \['none', 'text', 'image', 'audio', 'multimodal', 'flow'\]",
    ),
    "decoder latents of the wrong width": (
        lambda: DECODER(torch.randn(2, 4, 8)),
        r"x_latent must have shape \(batch, positions, 16\), got \(2, 4, 8\)",
    ),
    "decoder queries of another batch": (
        lambda: DECODER(torch.randn(2, 4, 16), output_query=torch.randn(3, 1, 16)),
        "output_query must hold 2 examples, as the other input does, got 3",
    ),
    "encoder given ids beyond its vocabulary": (
        lambda: ENCODER(torch.full((2, 5), 10)),
        r"input_ids must be token ids in \[0, vocab_size=10\)",
    ),
    "text adapter with an empty vocabulary": (
        lambda: TextInputAdapter(0, 8, 16),
        r"vocab_size \(0\) must be a positive",
    ),
    "text output adapter with 0 positions": (
        lambda: TextOutputAdapter(10, 0, 16),
        r"max_seq_len \(0\) must be a positive",
    ),
    "image adapter of 0 pixels": (
        lambda: ImageInputAdapter((0, 4, 3)),
        r"image_shape \(\(0, 4, 3\)\) must be three positive integers \(height, width, channels\)",
    ),
    "image adapter with 0 frequency bands": (
        lambda: ImageInputAdapter((4, 4, 3), num_frequency_bands=0),
        r"num_frequency_bands \(0\) must be a positive integer",
    ),
    "classifier with 0 classes": (
        lambda: ClassificationOutputAdapter(0),
        r"num_classes \(0\) must be a positive integer",
    ),
    # --- configurations: out of range, inconsistent, wrong types
    "heads not dividing the latent width": (
        lambda: tiny_text_config(d_latents=15, cross_attention_qk_channels=None),
        r"d_latents \(15\) must be divisible by num_cross_attention_heads \(2\)",
    ),
    "more cross-attention layers than blocks": (
        lambda: tiny_text_config(num_cross_attention_layers=2),
        r"num_cross_attention_layers \(2\) must not exceed num_self_attention_blocks \(1\)",
    ),
    "unknown input adapter": (
        lambda: tiny_text_config(input_adapter="smell"),
        r"input_adapter \('smell'\) must be one of",
    ),
    "dropout 1": (lambda: tiny_text_config(dropout=1.0), r"dropout \(1\.0\) must be a float in \[0, 1\)"),
    "fractional latents": (
        lambda: tiny_text_config(num_latents=2.5),
        r"num_latents \(2\.5\) must be a positive integer",
    ),
    "pad id outside the vocabulary": (lambda: tiny_text_config(pad_token_id=41), r"pad_token_id \(41\) must be in \[0"),
    "layer_norm_eps 0": (
        lambda: tiny_text_config(layer_norm_eps=0.0),
        r"layer_norm_eps \(0\.0\) must be a positive number",
    ),
    "string for a flag": (
        lambda: tiny_text_config(decode_masked_only="no"),
        r"decode_masked_only \('no'\) must be True or",
    ),
    "0 labels": (lambda: tiny_text_config(num_labels=0), r"num_labels \(0\) must be a positive integer"),
    "unknown problem type": (
        lambda: tiny_text_config(problem_type="ranking"),
        r"problem_type \('ranking'\) must be one of \[None, 'regression'",
    ),
    "image size of one axis": (lambda: tiny_image_config(image_size=[6]), r"image_size \(\[6\]\) must be two positive"),
    "conv downsampling not a power of 4": (
        lambda: tiny_image_config(image_preprocessing="conv", spatial_downsample=8),
        r"spatial_downsample \(8\) must be a power of 4",
    ),
    "masked LM on an image config": (
        lambda: PerceiverForMaskedLM(IMAGE),
        r"PerceiverForMaskedLM needs input_adapter='text', got 'image'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_value_error(case: str) -> None:
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_value_width_defaults_to_the_query_key_width() -> None:
    """A value width left unset is the query-key width (as in PerceiverAttention and DeepMind's Perceiver IO), so
    d_latents need not be divisible by the heads when the query-key width is: such a config is valid and runs."""
    config = tiny_text_config(d_latents=15)  # query-key widths 8, 2 heads
    model = PerceiverForMaskedLM(config).eval()
    assert model.perceiver.encoder.self_attention["0_0"].attention.v_proj.out_features == 8
    assert model(input_ids=IDS).logits.shape == (2, 8, config.vocab_size)


def test_labels_equal_to_minus_100_are_still_ignored() -> None:
    """The range checks keep the -100 "no loss" convention of transformers for both heads."""
    labels = torch.full_like(IDS, -100)
    labels[:, 1] = IDS[:, 1]
    assert torch.isfinite(MLM(input_ids=IDS, labels=labels).loss)
    assert torch.isfinite(TEXT_CLASSIFIER(input_ids=IDS, labels=torch.tensor([2, -100])).loss)


# --------------------------------------------------------------------------------------------------
# Bad command-line options and pretrained sources: the scripts fail before any work or write
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "-0.001"], r"argument --learning_rate: must be a number > 0, got '-0.001'"),
        (["--batch_size", "0"], r"argument --batch_size: must be an integer >= 1, got '0'"),
        (["--max_steps", "ten"], r"argument --max_steps: must be an integer, got 'ten'"),
        (["--dropout", "1"], r"argument --dropout: must be a number in \[0, 1\), got '1'"),
        (["--mlm_probability", "1.5"], r"argument --mlm_probability: must be a number in \[0, 1\), got '1.5'"),
        (["--train_file", "missing.parquet"], r"argument --train_file: file 'missing.parquet' does not exist"),
        (["--train_file", "reviews.xlsx"], r"argument --train_file: 'reviews.xlsx' has extension 'xlsx'; expected one"),
        (["--resume_from_checkpoint", "no/such/step_5"], r"argument --resume_from_checkpoint: no checkpoint folder"),
        (
            ["--max_steps", "10", "--warmup_steps", "10"],
            r"argument --warmup_steps: must be < --max_steps \(10\), got 10",
        ),
        (["--max_seq_len", "2"], r"argument --max_seq_len: must be >= 3 \(\[CLS\], a token, \[SEP\]\), got 2"),
        (["--predict_samples", "no mask here"], r"argument --predict_samples: 'no mask here' has no \[MASK\] token"),
        (["--lr_scheduler", "exponential"], r"argument --lr_scheduler: invalid choice: 'exponential'"),
    ],
)
def test_mlm_script_rejects_bad_options_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_mlm.main([*argv, "--output_dir", str(output_dir)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output_dir.exists()


@pytest.fixture(scope="module")
def small_mlm_with_big_tokenizer(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A masked LM embedding 41 ids saved beside a 300-token tokenizer: the ids would not fit."""
    path = tmp_path_factory.mktemp("mismatch")
    PerceiverForMaskedLM(tiny_text_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def test_mlm_script_rejects_a_tokenizer_larger_than_the_model(
    small_mlm_with_big_tokenizer: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(small_mlm_with_big_tokenizer), "--max_seq_len", "12"]
    with pytest.raises(ValueError) as error:
        run_mlm.main([*argv, "--tokenizer_name", str(tokenizer_dir), "--output_dir", str(output_dir)])
    assert str(error.value) == (
        f"--tokenizer_name {str(tokenizer_dir)!r} has {size} tokens, but --model_name_or_path "
        f"{str(small_mlm_with_big_tokenizer)!r} embeds only vocab_size=41: expected a tokenizer of at most 41 tokens "
        "(the model's own)"
    )
    # Without --tokenizer_name the model folder's own tokenizer is used, and it does not fit either.
    with pytest.raises(ValueError, match=r"--model_name_or_path .* has \d+ tokens, but --model_name_or_path"):
        run_mlm.main([*argv, "--output_dir", str(output_dir)])
    assert not output_dir.exists()


def test_text_classification_script_rejects_a_tokenizer_larger_than_the_model(
    small_mlm_with_big_tokenizer: Path, tmp_path: Path
) -> None:
    run_text_classification = import_example("run_text_classification")
    output_dir = tmp_path / "out"
    argv = [
        "--mlm_checkpoint",
        str(small_mlm_with_big_tokenizer),
        "--max_seq_len",
        "12",
        "--output_dir",
        str(output_dir),
    ]
    with pytest.raises(ValueError, match=r"--mlm_checkpoint .* has \d+ tokens, but --mlm_checkpoint .* embeds only"):
        run_text_classification.main(argv)
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "folder, extra, message",
    [
        ("missing", [], r"--model_name_or_path '.*missing': no such folder"),
        ("config only", [], r"the folder has no weights \(expected one of model\.safetensors"),
        ("empty", [], r"the folder has no config\.json \(not a saved model\)"),
        ("complete", ["--max_seq_len", "64"], r"--max_seq_len \(64\) exceeds the max_position_embeddings \(12\)"),
    ],
)
def test_mlm_script_rejects_missing_or_incomplete_models_before_any_write(
    saved_mlm: Path, tokenizer_dir: Path, tmp_path: Path, folder: str, extra: list[str], message: str
) -> None:
    source = tmp_path / folder
    if folder != "missing":
        source.mkdir()
    if folder == "config only":
        shutil.copy(saved_mlm / "config.json", source)
    if folder == "complete":
        shutil.copytree(saved_mlm, source, dirs_exist_ok=True)
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(source), "--tokenizer_name", str(tokenizer_dir), *extra]
    with pytest.raises(ValueError, match=message):
        run_mlm.main([*argv, "--output_dir", str(output_dir)])
    assert not output_dir.exists()
