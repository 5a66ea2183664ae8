"""The pretraining loop's parts (launch/pretrain.py reads top to bottom and calls these).

- :mod:`~mdm_dist.train.schedule`: warmup + cosine learning rate.
- :mod:`~mdm_dist.train.noise`: per-sample random draws keyed by (seed, step, sample key), so a
  sample's loss does not depend on the rank or micro-batch that holds it.
- :mod:`~mdm_dist.train.engine`: process group init, model + DeepSpeed engine, one optimizer step
  (with the NaN/inf guard).
- :mod:`~mdm_dist.train.ema`: EMA of the weights on ZeRO-3 partitions.
- :mod:`~mdm_dist.train.checkpoint`: DeepSpeed checkpoints + trainer state, resume, export.
- :mod:`~mdm_dist.train.metrics`: metrics.jsonl, console line, wandb, MFU.
- :mod:`~mdm_dist.train.preempt`: SIGTERM / SIGUSR1 -> save and exit at the next step.
- :mod:`~mdm_dist.train.samples`: text-to-image grids and caption tables during training.
- :mod:`~mdm_dist.train.precision`: does this CPU compute bf16 in hardware?
"""
