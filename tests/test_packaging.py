"""The built wheel carries everything the package reads at run time, and runs from any directory.

The wheel is built offline from a copy of the sources (no build isolation, so nothing is downloaded),
its contents are checked against pnp_batch/resources.py (the one place naming the package's data),
then it is unpacked into a folder of its own and run from a directory outside the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pnp_batch import resources

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pnp_batch"


def _package_files(folder: Path) -> set[str]:
    """The files under `folder` (as wheel paths), without caches."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "pnp_batch", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [whl] = dist.glob("pnp_batch-*.whl")
    return whl


def test_wheel_carries_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f for f in _package_files(PACKAGE) if f.endswith(".py")}
    assert modules and not modules - names, sorted(modules - names)
    for folder in resources.DATA_DIRS:
        files = _package_files(folder)
        assert files, f"{folder} is empty"
        missing = files - names
        assert not missing, f"not in the wheel: {sorted(missing)}"
    for path in (resources.TOKENIZER_ASSETS / "vocab.json", resources.CLIP_BPE,
                 resources.CONFIG_ASSETS / "sd15" / "unet" / "config.json", resources.PRESET_DIR / "tiny.yaml"):
        assert path.relative_to(ROOT).as_posix() in names
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^pnp-batch\s*=\s*pnp_batch\.cli:main$", zipfile.ZipFile(wheel).read(meta).decode(),
                     flags=re.MULTILINE)


def test_data_paths_are_named_in_one_place() -> None:
    """Every module finds its package files through resources.py, so the check above sees them all."""
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "resources.py" and re.search(r"Path\(__file__\)|os\.path\.dirname\(__file__\)", p.read_text())
    ]
    assert offenders == []


def test_installed_wheel_runs_the_tiny_model_from_another_directory(wheel: Path, tmp_path: Path, make_png) -> None:
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cat.png").write_bytes(make_png(width=80, height=64, seed=3))
    (elsewhere / "m.csv").write_text("id,image,source_prompt,target_prompt\nr1,cat.png,a cat,a dog\n")
    env = {**os.environ, "PYTHONPATH": str(site), "PNP_BATCH_CACHE": str(tmp_path / "cache")}

    def pnp(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pnp_batch", *argv], cwd=elsewhere, env=env,
                              capture_output=True, text=True, check=False, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import pnp_batch; print(pnp_batch.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=False)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    made = pnp("make-test-model", "model")
    assert made.returncode == 0, made.stderr[-3000:]
    assert (elsewhere / "model" / "model_index.json").is_file()
    run = pnp("run", "m.csv", "--out", "out", "--pipeline", "tiny", "--set", "resolution=64", "--set", "steps=4",
              "--set", "inversion_steps=4", "--no-report")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "out" / "images" / "r1.png").is_file()


def test_the_cpu_lock_pins_every_dependency_within_its_range() -> None:
    """requirements/cpu.lock (bash tools/lock.sh) pins every dependency pyproject.toml declares, at a
    version its range admits: a dependency added without refreshing the lock fails here, by name."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"])
    for extra in ("s3", "ray", "test", "dev"):
        declared += project["optional-dependencies"][extra]
    lock = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)",
                                        (ROOT / "requirements" / "cpu.lock").read_text(encoding="utf-8"),
                                        flags=re.MULTILINE)
    }
    problems = []
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by requirements/cpu.txt itself (the CPU build)
            continue
        if name not in lock:
            problems.append(f"{req.name} is not in requirements/cpu.lock: run bash tools/lock.sh")
        elif not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{req.name}=={lock[name]} in the lock is outside {req.specifier}")
    assert problems == []
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements" / "cpu.txt").read_text(), flags=re.MULTILINE)
