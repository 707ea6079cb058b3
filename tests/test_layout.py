"""The package's folders are its stages (docs/architecture.md): each imports only the stages below it,
no two modules import each other (lazily or not), and only io/ touches storage libraries."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pnp_batch"
ROOT = "root"  # config.py, errors.py, __init__.py: what every stage shares
ENTRY = {"cli", "__main__"}
# Each stage and the stages it may import; a stage not listed here fails the test until it is added.
ALLOWED = {
    ROOT: set(),
    "io": {ROOT},
    "models": {ROOT},
    "pnp": {ROOT},
    "masks": {ROOT, "io", "pnp"},  # region edits: masks given or found, framed, blended, pasted
    "translate": {ROOT, "io", "models", "pnp", "eval", "masks"},  # run --eval: the worker scores its rows
    "eval": {ROOT, "io", "models"},
    "report": {ROOT, "io"},
    "export": {ROOT, "io"},  # pnp-batch export: the view, samples read through io, the format writers
    "engines": {ROOT, "io", "models", "translate", "eval", "report"},
    "inspect": {ROOT, "io", "models", "translate", "report"},  # pnp-batch features
    "bench": {ROOT, "io", "models", "pnp", "translate", "eval", "engines", "report", "export"},
}
STORAGE_LIBS = ("fsspec", "s3fs", "pyarrow.fs", "boto3", "botocore")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """pnp_batch modules and other top-level names imported anywhere in the file (lazy imports too)."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pnp_batch.io import storage` imports the module pnp_batch.io.storage
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for n in names:
            (ours if n.startswith("pnp_batch") else others).add(n)
    return ours, others


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in ALLOWED and parts[1] not in ENTRY):
        return ROOT
    return parts[1]


def test_stages_import_only_the_stages_below_them():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        stage = _stage(name)
        if stage in ENTRY:
            continue
        assert stage in ALLOWED, f"{name}: stage {stage!r} is not in the layout (add it to ALLOWED and docs/architecture.md)"
        for dep in _imports(path, modules)[0]:
            dep_stage = _stage(dep)
            if dep_stage != stage and dep_stage not in ALLOWED[stage]:
                wrong.append(f"{name} imports {dep} ({stage} -> {dep_stage})")
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for dep in _imports(path, modules)[0]:
            while dep not in modules and "." in dep:
                dep = dep.rsplit(".", 1)[0]
            if dep != name and not name.startswith(dep + "."):
                graph[name].add(dep)
    cycles = []
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*trail[trail.index(d):], d]) if d in trail else f"{n} -> {d}")
            elif d not in state:
                visit(d, [*trail, d])
        state[n] = 2

    for n in sorted(modules):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_io_touches_storage_libraries():
    modules = _modules()
    users = sorted(
        name for name, path in modules.items()
        if _stage(name) != "io" and any(o.split(".")[0] in STORAGE_LIBS or o.startswith(STORAGE_LIBS)
                                        for o in _imports(path, modules)[1])
    )
    assert users == [], f"storage libraries imported outside pnp_batch/io: {users}"


def test_pnp_is_pure_tensors():
    """The sampling stage takes tensors and returns tensors: no file, table or image library."""
    modules = _modules()
    for name, path in modules.items():
        if _stage(name) == "pnp":
            others = {o.split(".")[0] for o in _imports(path, modules)[1]}
            assert not others & {"PIL", "pyarrow", "fsspec", "s3fs", "safetensors", "ray"}, (name, others)
