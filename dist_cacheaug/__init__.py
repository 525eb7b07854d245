"""dist_cacheaug: differentiable cache augmentation (Liu et al., ICML 2025) at scale."""

from .config import ConfigError, RunConfig, load_config
from .core.model import AugmentConfig, AugmentOutput, CacheAugmentedLM, TrainingLossOutput, sample_positions

__all__ = [
    "AugmentConfig",
    "AugmentOutput",
    "CacheAugmentedLM",
    "ConfigError",
    "RunConfig",
    "TrainingLossOutput",
    "load_config",
    "sample_positions",
]
__version__ = "0.1.0"
