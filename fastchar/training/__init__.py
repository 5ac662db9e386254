"""The training side, one job per module, in pipeline order:

config      TrainConfig, presets, TOML recipes and the argparse built from it
corpora     the training text by name or path (named corpora fetched once and verified)
checkpoint  atomic save, weights_only load and validation, the model rebuilt from one
device      the device and the kernel implementation a run uses
schedule    the learning-rate schedule
loop        the Trainer (batches, one step, evaluation, checkpoints)
progress    the progress line
cli         ``python -m fastchar.train``
"""
