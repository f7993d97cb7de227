"""Train a lowercase WordPiece tokenizer for Perceiver IO masked language modelling.

The tokenizer follows BERT's conventions (the same special tokens, normalizer, pre-tokenizer and
``##`` continuation prefix), so it works with every transformers component that expects a BERT-like
tokenizer: ``DataCollatorForLanguageModeling``, ``pipeline("fill-mask")`` and ``AutoTokenizer``.

Example:

```python
>>> from perceiver_hf import train_wordpiece_tokenizer
>>> tokenizer = train_wordpiece_tokenizer(["This movie was great!<br /><br />Loved it."] * 4, vocab_size=100)
>>> tokenizer.tokenize("This MOVIE<br />was great")
['this', 'movie', 'was', 'great']
>>> tokenizer.save_pretrained("my-tokenizer")  # reload with AutoTokenizer.from_pretrained("my-tokenizer")
```
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "train_wordpiece_tokenizer"]

# The order fixes the ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# IMDb reviews (and much scraped web text) keep HTML line breaks such as "<br /><br />"; without this
# rule they would become the most frequent "words" of the vocabulary.
_HTML_LINE_BREAK = Regex(r"<br\s*/?>")


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 10_000,
    model_max_length: int = 512,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a lowercase WordPiece tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    The pipeline is: replace HTML line breaks (``<br />``) by a space, BERT normalization (clean control
    characters, strip accents, lowercase), BERT pre-tokenization (split on whitespace and punctuation),
    WordPiece with the ``##`` continuation prefix, and the template ``[CLS] $A [SEP]``
    (``[CLS] $A [SEP] $B [SEP]`` for pairs).

    Args:
        texts (`Iterable[str]`):
            Training texts. Any iterable works, including a generator over a `datasets.Dataset` column;
            it is consumed once.
        vocab_size (`int`, *optional*, defaults to 10000):
            Maximum vocabulary size, special tokens included. The trained vocabulary is smaller when the
            texts do not hold enough distinct words and subwords.
        model_max_length (`int`, *optional*, defaults to 512):
            Maximum sequence length (special tokens included) used by ``truncation=True``. Use the model's
            ``max_position_embeddings``.
        min_frequency (`int`, *optional*, defaults to 2):
            Minimum number of occurrences for a merged subword to enter the vocabulary.

    Training is not bit-for-bit reproducible: the `tokenizers` trainer breaks ties between equally
    frequent merges in hash-map order, which changes from one process to the next. Train once, save
    the tokenizer and load it everywhere else (other processes, resumed runs, evaluation).

    Returns:
        `PreTrainedTokenizerFast`: a tokenizer with ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]`` and ``[MASK]``
        (ids 0 to 4) that returns ``input_ids`` and ``attention_mask`` (no ``token_type_ids``: the Perceiver
        does not use them). Save it with ``save_pretrained`` and reload it with
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: if an argument is out of range or `texts` is empty.
        TypeError: if `texts` is a single string or does not yield strings.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size ({vocab_size}) must be greater than the number of special tokens "
            f"({len(SPECIAL_TOKENS)}: {', '.join(SPECIAL_TOKENS)})"
        )
    if model_max_length < 2:
        raise ValueError(f"model_max_length ({model_max_length}) must be at least 2, to hold [CLS] and [SEP]")
    if min_frequency < 1:
        raise ValueError(f"min_frequency ({min_frequency}) must be at least 1")
    if isinstance(texts, str):
        # A single string is an iterable of characters: almost certainly a mistake.
        raise TypeError(f"texts must be an iterable of strings, not a single string ({texts[:40]!r}...)")
    texts = _non_empty(texts)

    unk, _, cls, sep, _ = SPECIAL_TOKENS
    tokenizer = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(_HTML_LINE_BREAK, " "),
            normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")

    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,  # its terminal progress bars turn into blank lines in logs
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("texts hold no word to learn a vocabulary from (are all texts empty?)")

    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )

    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    """Return an iterator over `texts`, raising `ValueError` if there is no text at all.

    Peeks at the first item instead of calling ``len``, so generators work and are consumed only once.
    """
    iterator = iter(texts)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("texts is empty: the tokenizer needs at least one training text") from None
    if not isinstance(first, str):
        raise TypeError(f"texts must yield strings, got {type(first).__name__} ({first!r:.60})")
    return itertools.chain([first], iterator)
