"""Evaluation: metrics (`python -m nuwa_core.eval`, cli.py), the continuation scores against held-out
truth (region_scores.py), the controls every score is judged beside (controls.py), the held-out
continuation protocol (`python -m nuwa_core.eval continuation`, continuation.py) and the baselines
NUWA-Infinity is compared with (`python -m nuwa_core.evaluation.baselines`)."""
