"""Compatibility: the 0.1.0 path of :mod:`piarec.scoring.arrow`.

MLflow models logged by piarec 0.1.0 carry their own copy of the pyfunc code, which
imports ``piarec.score_io``; this keeps them loading. New code imports :mod:`piarec.scoring.arrow`.
"""

from piarec.scoring.arrow import map_histories, to_record_batch  # noqa: F401
