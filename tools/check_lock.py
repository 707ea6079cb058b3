"""Check that this environment holds exactly what requirements/cpu.txt pins (CI runs it after the install).

Every installed distribution must be pinned by the lock at the version installed, every pin must be
installed, and `pip check` must pass. A lock that pip could only install by resolving (a package it
lacks, or pins that do not fit together) therefore fails CI instead of a new user.

    python tools/check_lock.py [requirements/cpu.txt]
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Installed by venv or by pip itself rather than by the requirements; never in a lock.
IGNORED = {"pip", "setuptools", "wheel", "distribute"}


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line in a requirements file and the files it includes (-r)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            out.update(pins(path.parent / line.split(None, 1)[1]))
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if m:
            out[canonical(m.group(1))] = m.group(3)
    return out


def project_name() -> str:
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^name\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    assert m, "pyproject.toml has no project name"
    return canonical(m.group(1))


def same_version(installed: str, pinned: str) -> bool:
    """Equal as pins compare: a pin without a local label (torch==2.13.0) accepts 2.13.0+cpu."""
    return installed == pinned or ("+" not in pinned and installed.split("+", 1)[0] == pinned)


def main(argv: list[str]) -> int:
    req = Path(argv[1] if len(argv) > 1 else "requirements/cpu.txt")
    wanted = pins(req)
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for name, version in sorted(installed.items()):
        if name in IGNORED or name == project_name():
            continue
        if name not in wanted:
            problems.append(f"installed but not in the lock: {name}=={version} (pip resolved it itself)")
        elif not same_version(version, wanted[name]):
            problems.append(f"{name}: installed {version}, the lock pins {wanted[name]}")
    for name, version in sorted(wanted.items()):
        if name not in installed and name not in IGNORED:
            problems.append(f"pinned but not installed: {name}=={version}")
    if project_name() not in installed:
        problems.append(f"{project_name()} itself is not installed")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        problems.append("pip check: " + (check.stdout + check.stderr).strip())
    for p in problems:
        print(f"check_lock: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_lock: {len(installed)} installed distributions, all as {req} pins them")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
