"""Shared pytest set-up: offline, single-threaded, seeded, and session-wide data fixtures.

The tests never reach the Hugging Face Hub: the environment is forced offline before transformers is
imported, and every data file comes from `examples/data` in this repository.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Set before transformers / huggingface_hub are imported: they read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "examples" / "data"

# Without `pip install -e .` the package is importable only from the repository root.
if importlib.util.find_spec("perceiver_hf") is None:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# Tiny models gain nothing from threads, and this machine's 2 cores are shared with training runs.
torch.set_num_threads(1)
hf_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def imdb_train() -> dict[str, list]:
    """The IMDb training sample shipped in `examples/data`: 500 reviews, `text` and `label` (0 neg, 1 pos)."""
    import pyarrow.parquet as pq

    path = DATA_DIR / "imdb_train.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the IMDb sample ships with the repository")
    return pq.read_table(path, columns=["text", "label"]).to_pydict()


@pytest.fixture(scope="session")
def imdb_texts(imdb_train: dict[str, list]) -> list[str]:
    """The review texts of the IMDb training sample."""
    return imdb_train["text"]


@pytest.fixture(scope="session")
def wordpiece_tokenizer(imdb_texts: list[str]):
    """A small (500-token) WordPiece tokenizer trained on the IMDb sample (about half a second)."""
    from perceiver_hf import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(imdb_texts, vocab_size=500, model_max_length=32)
