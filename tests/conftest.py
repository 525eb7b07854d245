import sys
from pathlib import Path

# tests import their helpers (tiny_models) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU- and SLURM-marked tests skip cleanly where there is no GPU / no SLURM cluster."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_slurm = pytest.mark.skip(reason="needs a SLURM cluster (sbatch on PATH)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slurm" in item.keywords and shutil.which("sbatch") is None:
            item.add_marker(no_slurm)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Tiny sentencepiece shards (seq_len 64) for tests that run the real trainer."""
    from train_helpers import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("trainer_data"))
