"""Accuracy, as an `evaluate` metric module that loads from this folder with no download.

The same inputs and output as the Hub's `accuracy` metric (`evaluate.load("accuracy")`), computed with numpy instead
of scikit-learn: `evaluate.load("examples/metrics/accuracy")` gives
`{"accuracy": fraction (or count) of predictions equal to their reference}`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference, (TP + TN) / (TP + TN + FP + FN)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground truth labels.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; `False` returns their count.
    sample_weight (`list` of `float`, defaults to `None`): sample weights.
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalize is True, else the (weighted) count of correct predictions.
Examples:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
