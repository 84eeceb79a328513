"""Compatibility: the 0.1.0 path of :mod:`piarec.scoring.scorer`.

MLflow models logged by piarec 0.1.0 carry their own copy of the pyfunc code, which
imports ``piarec.scorer``; this keeps them loading. New code imports :mod:`piarec.scoring.scorer`.
"""

from piarec.scoring.scorer import TopKScorer, Scored  # noqa: F401
