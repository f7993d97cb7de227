"""Tests of `train_wordpiece_tokenizer`: special tokens, normalization, save/load, argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from perceiver_hf import train_wordpiece_tokenizer
from perceiver_hf.tokenization_perceiver import SPECIAL_TOKENS


def test_special_tokens_have_ids_0_to_4(wordpiece_tokenizer) -> None:
    assert wordpiece_tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    tokens = wordpiece_tokenizer
    assert (tokens.pad_token_id, tokens.unk_token_id, tokens.cls_token_id, tokens.sep_token_id) == (0, 1, 2, 3)
    assert tokens.mask_token_id == 4


def test_encoding_lowercases_strips_accents_and_html_breaks(wordpiece_tokenizer) -> None:
    encoding = wordpiece_tokenizer("This MOVIE<br /><br />was Great")
    assert list(encoding) == ["input_ids", "attention_mask"]  # no token_type_ids: the model takes none
    tokens = wordpiece_tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "<" not in "".join(tokens) and "br" not in tokens
    assert wordpiece_tokenizer.decode(encoding["input_ids"], skip_special_tokens=True) == "this movie was great"
    assert wordpiece_tokenizer.tokenize("Café") == wordpiece_tokenizer.tokenize("cafe")


def test_mask_token_in_text_stays_one_token(wordpiece_tokenizer) -> None:
    tokens = wordpiece_tokenizer.tokenize("i watched this [MASK] twice")
    assert "[MASK]" in tokens


def test_padding_truncation_and_special_tokens_mask(wordpiece_tokenizer) -> None:
    batch = wordpiece_tokenizer(
        ["a long review " * 20, "short"], padding=True, truncation=True, return_special_tokens_mask=True
    )
    assert len(batch["input_ids"][0]) == wordpiece_tokenizer.model_max_length == 32
    assert batch["input_ids"][1][-1] == wordpiece_tokenizer.pad_token_id
    # 1 on [CLS], [SEP] and padding, 0 on the word pieces of "short", which the collator may mask.
    ids, special = batch["input_ids"][1], batch["special_tokens_mask"][1]
    assert special == [0 if i > 4 else 1 for i in ids]


def test_save_and_reload_with_auto_tokenizer(wordpiece_tokenizer, tmp_path: Path) -> None:
    wordpiece_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "I have watched this [MASK] and it was awesome!<br />"
    assert reloaded(text)["input_ids"] == wordpiece_tokenizer(text)["input_ids"]
    assert reloaded.model_input_names == ["input_ids", "attention_mask"]
    assert reloaded.model_max_length == 32
    assert reloaded.mask_token == "[MASK]" and reloaded.pad_token == "[PAD]"


def test_vocabulary_size_is_bounded_and_generators_work(imdb_texts: list[str]) -> None:
    tokenizer = train_wordpiece_tokenizer((text for text in imdb_texts[:50]), vocab_size=200)
    assert len(SPECIAL_TOKENS) < len(tokenizer) <= 200


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"texts": []}, ValueError, "texts is empty"),
        ({"texts": (t for t in [])}, ValueError, "texts is empty"),
        ({"texts": ["a b"], "vocab_size": 5}, ValueError, r"vocab_size \(5\)"),
        ({"texts": ["a b"], "model_max_length": 1}, ValueError, r"model_max_length \(1\)"),
        ({"texts": ["a b"], "min_frequency": 0}, ValueError, r"min_frequency \(0\)"),
        ({"texts": "a single string"}, TypeError, "not a single string"),
        ({"texts": [1, 2]}, TypeError, "must yield strings, got int"),
        ({"texts": ["", "  "]}, ValueError, "no word"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        train_wordpiece_tokenizer(**kwargs)
