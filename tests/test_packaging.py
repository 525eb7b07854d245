"""The installed wheel finds the repository files it reads (docs/design.md §2.3): the demo's
configs/demo/ and ``cacheaug slurm``'s slurm/train.sbatch. pyproject.toml ships both top-level folders
inside the package as dist_cacheaug/_files/; ``resources.repo_file`` reads the checkout first, else them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the package sources plus the folders it ships as data.
SOURCES = ["pyproject.toml", "README.md", "dist_cacheaug", "data_tools", "configs", "slurm"]
SHIPPED = {"configs": "dist_cacheaug._files.configs", "slurm": "dist_cacheaug._files.slurm"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_listed_packages_match_the_tree():
    """pyproject lists its packages (the data mapping needs it): a new sub-package or a new folder of
    configs/ or slurm/ must be added there, or the wheel would silently lack it."""
    setuptools = _pyproject()["tool"]["setuptools"]
    expected = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("dist_cacheaug", "data_tools")
        for p in (REPO / top).rglob("__init__.py")
    }
    for folder, package in SHIPPED.items():
        assert setuptools["package-dir"][package] == folder
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if any(f.is_file() for f in d.iterdir()):
                expected.add(".".join([package, *d.relative_to(REPO / folder).parts]))
    assert set(setuptools["packages"]) == expected
    for package in (p for p in expected if p.startswith("dist_cacheaug._files")):
        assert package in setuptools["package-data"], f"{package}: no package-data patterns"


def test_checkout_lookups_use_the_checkout():
    from dist_cacheaug import resources
    from dist_cacheaug.demo import pipeline

    assert resources.CHECKOUT == REPO
    assert resources.repo_file("slurm/train.sbatch") == REPO / "slurm" / "train.sbatch"
    assert pipeline.CONFIGS == REPO / "configs" / "demo"
    with pytest.raises(FileNotFoundError, match="no/such.file"):
        resources.repo_file("no/such.file")


INSTALLED_CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    site = Path(sys.argv[1]).resolve()
    import dist_cacheaug
    from dist_cacheaug.demo import pipeline
    from dist_cacheaug import resources

    assert Path(dist_cacheaug.__file__).resolve().is_relative_to(site), dist_cacheaug.__file__
    assert resources.CHECKOUT is None and pipeline.ROOT is None
    assert pipeline.CONFIGS.resolve().is_relative_to(site), pipeline.CONFIGS
    for name in ("quick", "full", "micro"):
        assert pipeline.load_budget(name).name == name
    assert pipeline._seq_len() > 0  # reads configs/demo/base.yaml
    sbatch = resources.repo_file("slurm/train.sbatch")
    assert sbatch.is_file() and sbatch.resolve().is_relative_to(site), sbatch
    print("ok", pipeline.CONFIGS)
    """
)


@pytest.mark.slow
def test_installed_wheel_finds_its_files(tmp_path):
    src, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "cwd"))
    for name in SOURCES:  # a clean copy: no build/ or egg-info left in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        cwd=elsewhere,
    )
    (wheel,) = wheels.glob("dist_cacheaug-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        cwd=elsewhere,
    )
    assert (site / "dist_cacheaug" / "_files" / "configs" / "demo" / "budgets" / "quick.yaml").is_file()

    # -S: no site-packages processing, so the venv's editable install (a .pth finder) is not active;
    # the dependencies come from the venv's site-packages, after the installed wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    env.setdefault("DS_ACCELERATOR", "cpu")
    python = [sys.executable, "-S"]

    out = subprocess.run(
        [*python, "-c", INSTALLED_CHECK, str(site)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr

    config = site / "dist_cacheaug" / "_files" / "configs" / "tiny_cpu.yaml"
    out = subprocess.run(
        [*python, "-m", "dist_cacheaug.cli", "slurm", str(config), "--dry-run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (exec_line,) = [line for line in out.stdout.splitlines() if line.startswith("exec bash ")]
    sbatch = Path(exec_line.split()[2])
    assert sbatch.is_file() and sbatch.resolve().is_relative_to(site.resolve()), exec_line
    assert REPO not in sbatch.resolve().parents
