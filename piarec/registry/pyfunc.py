"""The MLflow pyfunc model of a registered piarec version, defined from code (no pickle).

``piarec train`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"bundle": <bundle dir>}, code_paths=[<the piarec package>], ...)``
(:func:`piarec.train.job._log_pyfunc`); MLflow stores the file's source next to the bundle
and, on load, runs it: the last line hands MLflow the model object. In a notebook::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/piarec@champion")
    model.predict(pd.DataFrame({"user_id": ["u1"], "history": [["t1", "t7", "t9"]]}),
                  params={"k": 20})

Input: a DataFrame with ``history`` (a list of item ids per row: the user's positives),
optionally ``seen`` (more item ids never to recommend; history items are never
recommended either) and ``user_id``. Output: one row per input row with ``user_id``,
``item_ids`` (rank order), ``scores``, ``source`` (``model``, or ``popularity`` for a
history with no title the model knows) and ``model_version``. Scoring is
:class:`piarec.scoring.scorer.TopKScorer` on the bundle loaded by
:func:`piarec.models.bundle.load_bundle`, exactly as the daily job scores.

``model_version`` is, first found: ``model_config={"model_version": ...}`` given at load;
the registered version the model was loaded as (``models:/piarec/3`` -> ``3``,
``models:/piarec@champion`` -> the version the alias pointed at then), read from the file
``registered_model_meta`` that MLflow writes into the model folder it downloads for a
``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI; else (a path, ``runs:/``,
``models:/<model id>``) ``local-<digest of the bundle files>``, the label the daily job gives
an unregistered model. MLflow 3.18 stopped writing that file (every load would then say
``local-...``), so the project requires MLflow < 3.18 (pyproject.toml). With a local-disk
artifact store MLflow loads the stored folder in place and the file stays there, so a later
path or ``runs:/`` load of those files says the version last loaded by name.

The model carries its code and declares its environment: ``code/piarec/`` (the package,
put first on ``sys.path`` by MLflow at load) and a ``requirements.txt`` pinning exactly the
third-party packages imported at load and predict time
(:data:`piarec.train.job.PYFUNC_DISTRIBUTIONS`), so ``mlflow models serve`` and
``spark_udf(env_manager=...)`` can rebuild it; no piarec distribution is needed. A process that
has already imported ``piarec`` keeps its own copy (Python's module cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

BUNDLE_ARTIFACT = "bundle"
DEFAULT_K = 100
DEFAULT_BATCH_SIZE = 4096  # users per scoring batch
OUTPUT_COLUMNS = ["user_id", "item_ids", "scores", "source", "model_version"]
# What MLflow writes into a model it downloads by models:/<name>/<version> or models:/<name>@<alias>:
# YAML {model_name, model_version} (mlflow/store/artifact/models_artifact_repo.py,
# REGISTERED_MODEL_META_FILE_NAME). Absent for a path or runs:/ URI; null names for models:/<model id>.
REGISTERED_MODEL_META = "registered_model_meta"


def _lists(column: Any) -> list[list[str]]:
    """A column of list-likes (lists, numpy arrays, None) -> lists of str."""
    out = []
    for value in column:
        if value is None or (isinstance(value, float) and value != value):  # None / NaN
            out.append([])
        else:
            out.append([str(v) for v in value])
    return out


def registered_version(artifact_dir: str) -> str | None:
    """The registered version the MLflow model holding ``artifact_dir`` was downloaded as,
    or None when it was not loaded by a ``models:/<name>/<version|@alias>`` URI."""
    import yaml

    for folder in list(Path(artifact_dir).parents)[:2]:  # <model>/artifacts/bundle -> <model>
        if (folder / "MLmodel").is_file():
            meta = folder / REGISTERED_MODEL_META
            if not meta.is_file():
                return None
            version = (yaml.safe_load(meta.read_text()) or {}).get("model_version")
            return None if version is None else str(version)
    return None


class PiarecRecommender(PythonModel):
    """Top-K recommendations for user histories; see the module docstring."""

    def load_context(self, context) -> None:
        from piarec.models.bundle import files_digest, load_bundle, local_version, read_bundle_files

        directory = context.artifacts[BUNDLE_ARTIFACT]
        self.bundle = load_bundle(directory)
        self.index = self.bundle.item_index()
        config = getattr(context, "model_config", None) or {}
        label = config.get("model_version") or registered_version(directory)
        self.label = str(label) if label else local_version(files_digest(read_bundle_files(directory)))
        self.batch_size = int(config.get("batch_size") or DEFAULT_BATCH_SIZE)

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
        return batch.to_pandas()[OUTPUT_COLUMNS]


mlflow.models.set_model(PiarecRecommender())
