"""Using a trained coprocessor: loading a run for inference, Table-1 loss at k, downstream tasks and the
lm-eval adapter. Imports ``core``, ``variants`` and the foundation modules; never ``train``."""
