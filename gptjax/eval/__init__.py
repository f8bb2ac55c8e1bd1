"""Evaluation: restoring a run and scoring with it (scoring.py: held-out loss, log-likelihoods), zero- and
few-shot tasks and the built-in code tasks (tasks.py), and an lm-evaluation-harness model (harness.py)."""
