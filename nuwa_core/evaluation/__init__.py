"""Evaluation: metrics (`python -m nuwa_core.eval`, cli.py) and the baselines NUWA-Infinity is
compared with (`python -m nuwa_core.evaluation.baselines`)."""
