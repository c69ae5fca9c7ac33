"""A wheel built from the repo installs into a fresh venv and `pgsink --help` runs."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheels = list(dist.glob("pgsink-*.whl"))
    assert len(wheels) == 1
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheels[0])], capture_output=True,
                           text=True, check=True).stdout
    assert "pgsink/sql/migrations/0001_initial.sql" in names
    assert not any(line.split()[0].startswith(("engine/", "cli/")) for line in names.splitlines()[1:]), \
        "the wheel must not install top-level engine/ or cli/ packages"
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", str(wheels[0])], check=True,
                   capture_output=True, timeout=600)
    res = subprocess.run([str(env_dir / "bin" / "pgsink"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "migrate" in res.stdout and "worker" in res.stdout
