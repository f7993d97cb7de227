"""Accuracy as an `evaluate` metric module that loads from a local path, with no Hub access.

``evaluate.load("accuracy")`` downloads its script from the Hugging Face Hub, which fails offline.
This module is our own implementation of the same metric (same inputs and output key), loaded by
path instead:

```python
>>> import evaluate
>>> accuracy = evaluate.load("examples/metrics/accuracy")  # the folder holding this file
>>> accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
{'accuracy': 0.75}
```

`evaluate.load` expects the script to be named after its folder (``accuracy/accuracy.py``) and to
define exactly one `evaluate.Metric` subclass.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
With `sample_weight`, it is the weighted proportion instead. It ranges from 0 to 1 (1 is best).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels, as many as `predictions`.
    normalize (`bool`, *optional*, defaults to `True`): if `False`, return the number (or, with
        `sample_weight`, the total weight) of correct predictions instead of their proportion.
    sample_weight (`list` of `float`, *optional*): one weight per prediction.

Returns:
    `dict`: `{"accuracy": value}`, a `float`.

Example:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
          Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
          Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
          Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Proportion (or count) of predictions equal to their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://en.wikipedia.org/wiki/Accuracy_and_precision"],
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has {weights.size} values but there are {correct.size} predictions")
        total_correct = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": total_correct}
        if weights.sum() == 0:
            raise ValueError("accuracy is undefined without predictions (or with all sample weights 0)")
        return {"accuracy": total_correct / float(weights.sum())}
