"""Calibrated probabilities: one temperature fitted on the validation split, and what it changes.

A softmax trained with cross-entropy on a fine-tuned network is usually overconfident: its "95%" is
right less often than 95% of the time, and thresholds set on it mean less than they say. Dividing the
logits by one scalar T (temperature scaling, Guo et al. 2017) fixes most of that without changing
any prediction. The report here compares expected calibration error and NLL before and after T, and
picks the confidence threshold that reaches a target accuracy on validation, then checks it on test.
"""

import math

import numpy as np
import tensorflow as tf

from tl_keras.reporting import evaluation
from tl_keras.reporting import images

# The temperature is searched in [1 / MAX_TEMPERATURE, MAX_TEMPERATURE].
MAX_TEMPERATURE = 100.0
_SEARCH_STEPS = 100


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64, rows summing to 1."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll_of_logits(logits: np.ndarray, labels, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label], from the logits, so no probability underflows."""
    scaled = np.asarray(logits, np.float64) / temperature
    labels = np.asarray(labels)
    peak = scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled - peak).sum(axis=1)) + peak[:, 0]
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) on these examples.

    The NLL is convex in 1/T (its second derivative is a variance), so its derivative, the mean of
    E_p[logit] - logit[label] times T, has one zero: found by bisection on log(1/T). Logits that
    separate the classes perfectly want T -> 0; the search stops at 1 / MAX_TEMPERATURE.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        raise ValueError("fit_temperature needs at least one example. Received: 0 examples")
    true = logits[np.arange(len(labels)), labels]

    def slope(log_beta: float) -> float:  # d NLL / d beta, with beta = 1 / T.
        p = softmax(logits, 1.0 / math.exp(log_beta))
        return float(np.mean((p * logits).sum(axis=1) - true))

    low, high = -math.log(MAX_TEMPERATURE), math.log(MAX_TEMPERATURE)
    if slope(high) <= 0:
        return 1.0 / MAX_TEMPERATURE
    if slope(low) >= 0:
        return MAX_TEMPERATURE
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        if slope(middle) > 0:
            high = middle
        else:
            low = middle
    return 1.0 / math.exp((low + high) / 2)


def scores(logits: np.ndarray, labels, temperature: float) -> dict:
    """ECE, NLL and the reliability bins of softmax(logits / temperature)."""
    probabilities = softmax(logits, temperature)
    return {"ece": evaluation.expected_calibration_error(probabilities, labels),
            "nll": nll_of_logits(logits, labels, temperature),
            "reliability": evaluation.reliability_bins(probabilities, labels)}


def build_report(test_logits: np.ndarray, test_labels, temperature: float = 1.0,
                 validation_logits: np.ndarray | None = None, validation_labels=None,
                 target_accuracy: float | None = None) -> dict:
    """The calibration section of the evaluation report, for evaluation.write_report.

    `temperature` is the one the export serves (1.0 when calibration is off). The confidence
    threshold for `target_accuracy` is chosen on the validation split's served probabilities and
    checked on test's; without a validation split there is none (choosing it on test would grade it
    on the examples that chose it).
    """
    report = {
        "temperature": float(temperature),
        "bins": evaluation.CALIBRATION_BINS,
        "test_examples": int(len(test_labels)),
        "validation_examples": 0 if validation_labels is None else int(len(validation_labels)),
        "before": scores(test_logits, test_labels, 1.0),
        "after": scores(test_logits, test_labels, temperature),
        "target_accuracy": target_accuracy,
        "threshold": None,
    }
    if target_accuracy is not None and validation_labels is not None and len(validation_labels):
        validation = softmax(validation_logits, temperature)
        threshold = evaluation.confidence_threshold(validation, validation_labels, target_accuracy)
        report["threshold"] = threshold
        if threshold is not None:
            report["threshold_validation"] = evaluation.selective_metrics(validation, validation_labels,
                                                                          threshold)
            report["threshold_test"] = evaluation.selective_metrics(softmax(test_logits, temperature),
                                                                    test_labels, threshold)
    return report


def summary(report: dict) -> dict:
    """The report's numbers that metrics.json and TensorBoard keep: flat, no bins."""
    out = {"temperature": report["temperature"],
           "ece_before": report["before"]["ece"], "ece_after": report["after"]["ece"],
           "nll_before": report["before"]["nll"], "nll_after": report["after"]["nll"]}
    if report.get("threshold") is not None:
        out["confidence_threshold"] = report["threshold"]
        out["threshold_test_coverage"] = report["threshold_test"]["coverage"]
        if report["threshold_test"]["accuracy"] is not None:
            out["threshold_test_accuracy"] = report["threshold_test"]["accuracy"]
    return out


def write_summaries(log_dir: str, step: int, report: dict):
    """calibration/* scalars and the reliability diagram into the TensorBoard run at `log_dir`."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for name, value in summary(report).items():
            tf.summary.scalar(f"calibration/{name}", value)
        diagram = images.reliability_diagram(report["before"]["reliability"], report["after"]["reliability"],
                                             f"temperature {report['temperature']:.3g}")
        tf.summary.image("reliability_diagram", diagram[None],
                         description="Accuracy against confidence on the test split: the red line before "
                                     "temperature scaling, the bars after; the diagonal is calibrated.")
    writer.close()
