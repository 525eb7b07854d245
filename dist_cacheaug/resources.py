"""Files of the repository's top level (configs/, slurm/) that the package reads, found both in a
checkout and in an installed wheel (pyproject.toml ships copies under ``dist_cacheaug/_files/``)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_TOP = Path(__file__).resolve().parents[1]
#: The repository checkout this package runs from, or None when it runs from an installed wheel.
CHECKOUT: Path | None = _TOP if (_TOP / "pyproject.toml").is_file() and (_TOP / "configs").is_dir() else None


def repo_file(relpath: str) -> Path:
    """A file or folder of the repository's top level (``"slurm/train.sbatch"``, ``"configs/demo"``).

    From a checkout it is the checkout's own file, so edits take effect at once. An installed wheel
    carries a copy of ``configs/`` and ``slurm/`` inside the package, under ``dist_cacheaug/_files/``
    (pyproject.toml maps the folders there at build time; git holds one copy)."""
    if CHECKOUT is not None and (CHECKOUT / relpath).exists():
        return CHECKOUT / relpath
    shipped = importlib.resources.files("dist_cacheaug").joinpath("_files", *Path(relpath).parts)
    if isinstance(shipped, Path) and shipped.exists():
        return shipped
    where = f"{CHECKOUT} nor " if CHECKOUT is not None else ""
    raise FileNotFoundError(
        f"{relpath} is in neither {where}the installed package ({shipped}): "
        "reinstall dist_cacheaug, or run from a checkout of the repository"
    )
