"""Spark jobs of the pipeline. Each is runnable with spark-submit and through `piarec`."""
