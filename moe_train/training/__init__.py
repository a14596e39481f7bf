"""The training loop's parts. `moe_train.train.train` puts them together:

train_state.py  TrainState: step, best validation loss, skipped steps (checkpointed)
cadence.py      Every: "every n steps and at the last one"
batches.py      BatchPlan: this rank's share of every global batch (train and validation)
optim.py        AdamW parameter groups, the learning-rate schedule, precision
step.py         lm_loss and train_step: one optimizer step through the Engine
evaluation.py   evaluate and the Evaluator (validation cadence)
checkpointer.py Checkpointer (checkpoint cadence, resume)
logger.py       TrainLogger (log cadence: metrics, MFU, the progress bar)
build.py        config -> data, model, engine

The metrics files and sinks live in moe_train.metrics, the engines in moe_train.engines.
"""
