"""Per-class precision, recall and F1 of a classifier's test predictions (no model, no config)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def per_class_report(y: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (one row each, in label order, real names in
    the `class` column), then accuracy, macro and weighted averages. Rows are by position, so a
    class may be called `accuracy` or `macro avg` without clashing with the summary rows."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    rows = [
        {"class": c, "precision": p[i], "recall": r[i], "f1-score": f[i], "support": int(support[i])}
        for i, c in enumerate(classes)
    ]
    total = int(support.sum())
    accuracy = float(np.mean(y == predicted)) if total else 0.0
    rows.append(
        {
            "class": "accuracy",
            "precision": accuracy,
            "recall": accuracy,
            "f1-score": accuracy,
            "support": total,
        }
    )
    rows.append(
        {
            "class": "macro avg",
            "precision": p.mean(),
            "recall": r.mean(),
            "f1-score": f.mean(),
            "support": total,
        }
    )
    weights = support / max(total, 1)
    rows.append(
        {
            "class": "weighted avg",
            "precision": float(p @ weights),
            "recall": float(r @ weights),
            "f1-score": float(f @ weights),
            "support": total,
        }
    )
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])
