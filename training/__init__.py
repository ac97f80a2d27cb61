"""The training loop's parts, one job per module: config schema, objective, DeepSpeed setup, checkpoints,
EMA, logging, periodic sampling, evaluation. `train.py` and `sample.py` compose them."""
