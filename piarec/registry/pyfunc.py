"""The MLflow pyfunc model of a registered piarec version, defined from code (no pickle).

``piarec train`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"bundle": <bundle dir>})``; MLflow stores the file's source next to the bundle
and, on load, runs it: the last line hands MLflow the model object. In a notebook::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/piarec@champion")
    model.predict(pd.DataFrame({"user_id": ["u1"], "history": [["t1", "t7", "t9"]]}),
                  params={"k": 20})

Input: a DataFrame with ``history`` (a list of item ids per row: the user's positives),
optionally ``seen`` (more item ids never to recommend; history items are never
recommended either) and ``user_id``. Output: one row per input row with ``user_id``,
``item_ids`` (rank order), ``scores`` and ``source`` (``model``, or ``popularity`` for a
history with no title the model knows). Scoring is :class:`piarec.scoring.scorer.TopKScorer` on
the bundle loaded by :func:`piarec.models.bundle.load_bundle`, exactly as the daily job scores.

Needs the ``piarec`` distribution (with torch) installed where the model is loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

BUNDLE_ARTIFACT = "bundle"
DEFAULT_K = 100


def _lists(column: Any) -> list[list[str]]:
    """A column of list-likes (lists, numpy arrays, None) -> lists of str."""
    out = []
    for value in column:
        if value is None or (isinstance(value, float) and value != value):  # None / NaN
            out.append([])
        else:
            out.append([str(v) for v in value])
    return out


class PiarecRecommender(PythonModel):
    """Top-K recommendations for user histories; see the module docstring."""

    def load_context(self, context) -> None:
        from piarec.models.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT])
        self.index = self.bundle.item_index()
        config = getattr(context, "model_config", None) or {}
        self.label = str(config.get("model_version", "pyfunc"))
        self.batch_size = int(config.get("batch_size", 4096))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from piarec.scoring.scorer import TopKScorer
        from piarec.scoring.arrow import map_histories, to_record_batch

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "history" not in model_input.columns:
            raise ValueError(
                f"the input needs a 'history' column of item-id lists; got columns {list(model_input.columns)}"
            )
        k = int((params or {}).get("k") or DEFAULT_K)
        history = _lists(model_input["history"])
        extra = _lists(model_input["seen"]) if "seen" in model_input.columns else [[] for _ in history]
        seen = [h + s for h, s in zip(history, extra)]
        if "user_id" in model_input.columns:
            users = [str(u) for u in model_input["user_id"]]
        else:
            users = [str(i) for i in model_input.index]
        n = self.bundle.n_items
        hist_csr, _ = map_histories(history, self.index, n)
        seen_csr, _ = map_histories(seen, self.index, n)
        scored = TopKScorer(self.bundle, k, self.batch_size).score(hist_csr, seen_csr)
        batch = to_record_batch(users, scored, self.bundle.item_ids, self.label)
        return batch.to_pandas()[["user_id", "item_ids", "scores", "source"]]


mlflow.models.set_model(PiarecRecommender())
