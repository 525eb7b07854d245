"""The training system: the DeepSpeed engine (``engine``, the only module that imports DeepSpeed), the
loop (``trainer``), checkpoints, validation, metrics, the analytic estimates, the step benchmark and
SLURM job rendering. Imports ``core``, ``variants`` and the foundation modules; never ``evaluation``."""
