"""The built wheel, installed into a fresh venv, works outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sh(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(map(str, argv))}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    """pip wheel, a fresh venv in a temp folder, then the README's first commands from that folder:
    nothing may depend on the source tree (files next to the code, experiments/, the repo's cwd)."""
    src = tmp_path / "checkout"             # what the build reads, copied: it leaves nothing in the repository
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    sh(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-q", "-w", tmp_path / "dist", cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("fortress-*.whl"))
    venv = tmp_path / "venv"
    try:
        sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        sh(venv / "bin" / "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
        # the dependencies (torch etc.) are this environment's, appended to the new venv's path: installing torch
        # again took ~2 minutes, and `make` already resolves them from pyproject.toml in a fresh venv (CI does);
        # a path in a .pth file is not a site dir, so this environment's editable `fortress` (src/) stays invisible
        site = sh(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=tmp_path).stdout.strip()
        deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        (Path(site) / "fortress_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
        work = tmp_path / "elsewhere"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("FORTRESS_DATA", "PYTHONPATH")}
        fortress = venv / "bin" / "fortress"
        assert "run" in sh(fortress, "--help", cwd=work, env=env).stdout
        res = sh(fortress, "run", "--data", "synthetic", "--out", work / "run", "--set", "rounds=3",
                 "--set", "clients_per_round=8", "--set", "threads=1", "--quiet", cwd=work, env=env)
        assert "wrote" in res.stdout and (work / "run" / "model.pt").is_file()
        assert "users          5,000" in sh(fortress, "data", "stats", "synthetic", cwd=work, env=env).stdout
        assert "rank  item  score" in sh(fortress, "recommend", work / "run", "--user", "u0", "-k", "3",
                                         cwd=work, env=env).stdout
        where = sh(venv / "bin" / "python", "-c", "import fortress; print(fortress.__file__)", cwd=work, env=env)
        assert str(venv) in where.stdout                                     # the wheel's copy, not src/
    finally:
        shutil.rmtree(venv, ignore_errors=True)
