"""The method: the cache-augmented model, its masks and losses, building the frozen decoder, and the one
augmentation step and decode loop. Imports only ``dist_cacheaug.config`` from outside this package;
knows nothing of DeepSpeed, data loading, evaluation or SLURM."""
