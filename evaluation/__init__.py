"""Evaluation apart from the training loop: sample fidelity between two runs (`evaluation.metrics`) and the
VMoBA-vs-full comparison report (`evaluation.report`). Used by `scripts/compare.py`; may import `training`,
which never imports it."""
