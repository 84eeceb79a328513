"""Compatibility: the 0.1.0 path of :mod:`piarec.models.bundle`.

MLflow models logged by piarec 0.1.0 carry their own copy of the pyfunc code, which
imports ``piarec.bundle``; this keeps them loading. New code imports :mod:`piarec.models.bundle`.
"""

from piarec.models.bundle import load_bundle, save_bundle, ModelBundle  # noqa: F401
