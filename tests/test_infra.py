"""infra/ agrees with itself and with the CLI: commands parse, GPUs match, versions match, crons are valid."""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pnp_batch.config import PRESET_DIR

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE = "ghcr.io/YOUR_ORG/pnp-batch:latest"
GPU_GROUP = "gpu-workers"
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


# ---------------------------------------------------------------------------------------------
# Loading


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under infra/, plus YAML files embedded in ConfigMaps, with a label each."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in yaml_files():
        rel = str(path.relative_to(ROOT))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{rel} document {i} is not a mapping"
            out.append((f"{rel}#{i}", doc))
            if doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for j, inner in enumerate(yaml.safe_load_all(value)):
                            if inner is not None:
                                out.append((f"{rel}#{i}:{key}#{j}", inner))
    return out


DOCS = load_documents()


def docs_of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(label, d) for label, d in DOCS if d.get("kind") == kind]


def strings_in(node: Any) -> Iterator[str | list[str]]:
    """Every string value in a YAML tree; a list of strings is also yielded whole (exec-form commands)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings_in(v)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            yield list(node)
        for v in node:
            yield from strings_in(v)


def at_command_position(tokens: list[str], i: int) -> bool:
    """Whether tokens[i] is a program name: line start, after an operator or `--`, or after VAR=value."""
    before = tokens[:i]
    while before and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", before[-1]):
        before.pop()
    return not before or before[-1] in SHELL_OPERATORS | {"--"} or before[-1].endswith(";")


def commands_in_text(text: str) -> list[list[str]]:
    """`pnp-batch ...` command lines in shell text (line continuations joined), as argv lists."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            if tok != "pnp-batch" or not at_command_position(tokens, i):
                continue
            argv = []
            for t in tokens[i + 1 :]:
                if t in SHELL_OPERATORS:
                    break
                argv.append(t.rstrip(";"))
            if argv:
                found.append(argv)
    return found


def commands_in(node: Any) -> list[list[str]]:
    found: list[list[str]] = []
    for s in strings_in(node):
        if isinstance(s, list):
            if s[0] == "pnp-batch" and len(s) > 1:
                found.append(s[1:])
        else:
            found.extend(commands_in_text(s))
    return found


def readme_commands() -> list[list[str]]:
    text = (INFRA / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.DOTALL)
    return [c for block in blocks for c in commands_in_text(block)]


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (last one wins), else None."""
    value = None
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(name + "="):
            value = tok.split("=", 1)[1]
    return value


def lock_pins(path: Path) -> dict[str, str]:
    """name -> version of every pin in a lock file (requirements/*.lock)."""
    return dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE))


def dockerfile_args() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    return {m[0]: m[1].strip('"') for m in re.findall(r"^ARG\s+(\w+)(?:=(\S*))?", text, flags=re.MULTILINE)}


# ---------------------------------------------------------------------------------------------
# Cluster specs


def cluster_specs() -> list[tuple[str, dict[str, Any], str | None]]:
    """(label, RayCluster spec, entrypoint or None) for every RayCluster, RayJob and RayCronJob."""
    out = []
    for label, d in DOCS:
        kind, spec = d.get("kind"), d.get("spec") or {}
        if kind == "RayCluster":
            out.append((label, spec, None))
        elif kind == "RayJob":
            out.append((label, spec["rayClusterSpec"], spec["entrypoint"]))
        elif kind == "RayCronJob":
            job = spec["jobTemplate"]
            out.append((label, job["rayClusterSpec"], job["entrypoint"]))
    return out


def gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert GPU_GROUP in groups, f"no worker group {GPU_GROUP!r}"
    return groups[GPU_GROUP]


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def group_gpus(group: dict[str, Any]) -> int:
    limits = containers(group["template"])[0]["resources"]["limits"]
    return int(limits["nvidia.com/gpu"])


CLUSTERS = cluster_specs()


def test_every_yaml_file_loads_and_is_found() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in yaml_files()}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/raycronjob.yaml",
        "kuberay/cronjob-submit-rayjob.yaml",
        "ray/aws-gpu-cluster.yaml",
    } <= names
    kinds = {d.get("kind") for _, d in DOCS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role", "RoleBinding"} <= kinds
    for _, d in DOCS:
        if "kind" in d:
            assert d.get("apiVersion"), d["kind"]
            name = d.get("metadata", {}).get("name") or d.get("metadata", {}).get("generateName")
            assert name, d["kind"]


def test_ray_resources_use_ray_io_v1() -> None:
    for label, d in DOCS:
        if d.get("kind", "").startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1", label


# ---------------------------------------------------------------------------------------------
# Commands


def without_embedded_yaml(doc: dict[str, Any]) -> dict[str, Any]:
    """A ConfigMap minus the YAML files in its data (those are checked as documents of their own)."""
    if doc.get("kind") != "ConfigMap":
        return doc
    data = {k: v for k, v in (doc.get("data") or {}).items() if not k.endswith((".yaml", ".yml"))}
    return {**doc, "data": data}


def all_commands() -> list[tuple[str, list[str]]]:
    found = [(label, argv) for label, d in DOCS for argv in commands_in(without_embedded_yaml(d))]
    found += [("infra/README.md", argv) for argv in readme_commands()]
    return found


COMMANDS = all_commands()


def test_commands_are_found() -> None:
    yaml_runs = [argv for label, argv in COMMANDS if label != "infra/README.md" and argv[0] == "run"]
    assert len(yaml_runs) >= 3  # rayjob, raycronjob, the ConfigMap's RayJob
    verbs = {argv[0] for _, argv in COMMANDS}
    assert {"run", "status", "validate"} <= verbs


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    cli = pytest.importorskip("pnp_batch.cli", reason="pnp_batch.cli is not written yet")  # TODO: remove skip
    return cli.build_parser()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_command_parses_with_the_cli(parser: argparse.ArgumentParser, where: str, argv: list[str]) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse reports errors by exiting
        pytest.fail(f"{where}: `pnp-batch {shlex.join(argv)}` does not parse (exit {e.code})")


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_pipeline_is_an_existing_preset(where: str, argv: list[str]) -> None:
    pipeline = flag(argv, "--pipeline")
    if argv[0] == "run":
        assert pipeline, f"{where}: cluster and documented runs name their pipeline explicitly"
    if pipeline is not None:
        assert (PRESET_DIR / f"{pipeline}.yaml").is_file(), f"{where}: no preset pipelines/{pipeline}.yaml"


def test_set_keys_are_pipeline_keys() -> None:
    from pnp_batch.config import PipelineConfig

    known = set(PipelineConfig.__dataclass_fields__)
    for where, argv in COMMANDS:
        for i, tok in enumerate(argv):
            if tok == "--set":
                key = argv[i + 1].split("=", 1)[0]
                assert key in known, f"{where}: --set {key} is not a pipeline key"


def test_cluster_jobs_join_the_cluster_with_the_ray_engine() -> None:
    entrypoints = [(label, ep) for label, _, ep in CLUSTERS if ep is not None]
    assert len(entrypoints) >= 3
    for label, ep in entrypoints:
        cmds = commands_in_text(ep)
        assert len(cmds) == 1 and cmds[0][0] == "run", f"{label}: entrypoint is one `pnp-batch run`"
        argv = cmds[0]
        assert flag(argv, "--engine") == "ray", label
        assert flag(argv, "--ray-address") == "auto", label
        assert flag(argv, "--gpus-per-worker") is not None, label
        assert flag(argv, "--out").startswith("s3://"), label


def test_documented_cluster_runs_use_the_ray_engine() -> None:
    for where, argv in COMMANDS:
        if flag(argv, "--engine") == "ray":
            assert flag(argv, "--ray-address") == "auto", f"{where}: {shlex.join(argv)}"


def test_worker_gpus_match_gpus_per_worker() -> None:
    for label, spec, ep in CLUSTERS:
        gpus = group_gpus(gpu_group(spec))
        if ep is None:
            # A standalone cluster takes the documented commands: the README's must fit it.
            wanted = [flag(a, "--gpus-per-worker") for _, a in COMMANDS if flag(a, "--engine") == "ray"]
        else:
            wanted = [flag(commands_in_text(ep)[0], "--gpus-per-worker")]
        assert wanted, label
        for w in wanted:
            assert w is not None
            assert gpus == math.ceil(float(w)), f"{label}: pod has {gpus} GPU(s), --gpus-per-worker {w}"


def test_gpu_group_scales_from_zero_with_the_autoscaler() -> None:
    for label, spec, _ in CLUSTERS:
        assert spec.get("enableInTreeAutoscaling") is True, label
        g = gpu_group(spec)
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, label
        assert g["maxReplicas"] == 8, label
        res = containers(g["template"])[0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"].get(
            "nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]
        )
        head = spec["headGroupSpec"]
        assert str(head["rayStartParams"]["num-gpus"]) == "0", label
        assert "nvidia.com/gpu" not in containers(head["template"])[0]["resources"].get("limits", {}), label


def test_ray_version_and_image_match_the_dockerfile() -> None:
    ray_version = dockerfile_args()["RAY_VERSION"]
    for label, spec, _ in CLUSTERS:
        assert spec["rayVersion"] == ray_version, label
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in containers(pod):
                assert c["image"] == IMAGE, label


def test_credentials_come_from_a_secret() -> None:
    for label, spec, _ in CLUSTERS:
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            env = {e["name"]: e for e in containers(pod)[0].get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert name in env, f"{label}: {name} missing"
                assert "value" not in env[name], f"{label}: {name} must not be written in the file"
                assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name, label


def test_jobs_release_their_cluster() -> None:
    for label, d in DOCS:
        if d.get("kind") == "RayJob":
            assert d["spec"]["shutdownAfterJobFinishes"] is True, label
        if d.get("kind") == "RayCronJob":
            assert d["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] is True, label


# ---------------------------------------------------------------------------------------------
# Schedules

CRON_FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(
                ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
            )
        },
    ),
    (0, 7, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression: *, n, a-b, lists and /steps, month and weekday names."""
    fields = expr.split()
    if len(fields) != 5:
        return False

    def value(tok: str, lo: int, hi: int, names: dict[str, int]) -> int | None:
        v = names.get(tok.lower()) if not tok.isdigit() else int(tok)
        return v if v is not None and lo <= v <= hi else None

    for text, (lo, hi, names) in zip(fields, CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                return False
            if base == "*":
                continue
            a, dash, b = base.partition("-")
            va = value(a, lo, hi, names)
            if va is None:
                return False
            if dash:
                vb = value(b, lo, hi, names)
                if vb is None or vb < va:
                    return False
            elif step:
                return False  # "5/10" is not standard
    return True


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ("0 3 * * *", True),
        ("*/15 0-6,22-23 1 jan-mar mon-fri", True),
        ("0 3 * *", False),
        ("60 3 * * *", False),
        ("0 24 * * *", False),
        ("0 3 0 * *", False),
        ("0 3 * * 8", False),
        ("0 3 * * */0", False),
        ("5-1 * * * *", False),
    ],
)
def test_cron_checker(expr: str, ok: bool) -> None:
    assert valid_cron(expr) is ok


def test_schedules_are_valid_daily_crons() -> None:
    schedules = [
        (label, d["spec"]["schedule"]) for label, d in DOCS if d.get("kind") in ("CronJob", "RayCronJob")
    ]
    assert len(schedules) == 2
    for label, expr in schedules:
        assert valid_cron(expr), f"{label}: {expr!r}"
        assert tuple(expr.split()[2:]) == ("*", "*", "*"), f"{label}: the run is daily"


def daily_entrypoints() -> list[tuple[str, str]]:
    out = [(label, d["spec"]["jobTemplate"]["entrypoint"]) for label, d in docs_of_kind("RayCronJob")]
    for label, d in docs_of_kind("RayJob"):
        if d["metadata"].get("labels", {}).get("pnp-batch/schedule") == "daily":
            out.append((label, d["spec"]["entrypoint"]))
    return out


def test_daily_runs_reuse_the_same_prefixes() -> None:
    runs = daily_entrypoints()
    assert len(runs) == 2
    argvs = [commands_in_text(ep)[0] for _, ep in runs]
    assert argvs[0] == argvs[1], "RayCronJob and the CronJob's RayJob run the same command"
    argv = argvs[0]
    for name in ("--out", "--features"):
        value = flag(argv, name)
        assert value and value.startswith("s3://"), name
    # Nothing that changes from day to day: no shell expansion, no templating, no --overwrite.
    joined = " ".join(argv)
    assert "$" not in joined and "{{" not in joined and "`" not in joined
    assert "--overwrite" not in argv


def test_cronjob_submits_the_rayjob_from_its_configmap() -> None:
    [(_, cron)] = docs_of_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["kubectl", "create"]
    path = Path(argv[argv.index("-f") + 1])
    [mount] = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmaps = {d["metadata"]["name"]: d for _, d in docs_of_kind("ConfigMap")}
    cm = configmaps[volume["configMap"]["name"]]
    rayjob = yaml.safe_load(cm["data"][path.name])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"].get("generateName"), "a fresh name per run"

    # The pod's service account may create RayJobs.
    sa = pod["serviceAccountName"]
    [(_, binding)] = docs_of_kind("RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    roles = {d["metadata"]["name"]: d for _, d in docs_of_kind("Role")}
    rules = roles[binding["roleRef"]["name"]]["rules"]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules
    )


# ---------------------------------------------------------------------------------------------
# Dockerfile and the ray up cluster


def test_dockerfile_builds_a_cuda_image_with_optional_baked_weights() -> None:
    text = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    args = dockerfile_args()
    assert re.search(r"^FROM\s+\$\{CUDA_IMAGE\}", text, flags=re.MULTILINE) and args["CUDA_IMAGE"].startswith(
        "nvidia/cuda:"
    )
    assert "runtime" in args["CUDA_IMAGE"]
    # every package from the GPU lock, without resolution; its torch is a CUDA build, its Ray the image's
    assert "pip install --no-deps -r requirements/gpu.lock" in text and "pip check" in text
    gpu = lock_pins(ROOT / "requirements" / "gpu.lock")
    assert re.fullmatch(r"\d+\.\d+\.\d+", gpu["torch"]) and any(n.startswith("nvidia-") for n in gpu)
    assert gpu["ray"] == args["RAY_VERSION"]
    assert "pnp-batch" not in gpu  # the package itself is installed from the source after the lock
    assert "requirements/cpu.txt" not in re.sub(r"#.*", "", text), (
        "the CPU torch pin must not reach the image"
    )
    assert "BAKE_MODEL" in args and args["BAKE_MODEL"] == ""
    assert "PNP_MODEL_DIR=/models" in text
    assert "python3.11" in text
    assert ".[s3,ray]" in text
    assert re.search(r'^ENTRYPOINT \["pnp-batch"\]', text, flags=re.MULTILINE)
    ignore = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    assert "!infra/bake_model.py" in ignore and "!pnp_batch/" in ignore


def test_bake_model_names_the_folder_after_the_hub_id() -> None:
    spec = importlib.util.spec_from_file_location("bake_model", INFRA / "bake_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.local_name("stabilityai/stable-diffusion-2-1-base") == "stable-diffusion-2-1-base"
    assert module.local_name("local-model") == "local-model"
    assert "stable-diffusion-2-1-base" in (INFRA / "README.md").read_text(encoding="utf-8")


def test_aws_cluster_file() -> None:
    cfg = yaml.safe_load((INFRA / "ray" / "aws-gpu-cluster.yaml").read_text(encoding="utf-8"))
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"] == "us-east-1"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.xlarge"
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert len(workers) == 1
    [w] = workers
    assert w["node_config"]["InstanceType"] == "g5.xlarge"
    assert w["resources"]["GPU"] == 1
    assert w["min_workers"] == 0 and w["max_workers"] == 8 and cfg["max_workers"] == 8
    setup = "\n".join(cfg["setup_commands"])
    args = dockerfile_args()
    assert "--no-deps -r /home/ubuntu/pnp-batch/requirements/gpu.lock" in setup
    assert lock_pins(ROOT / "requirements" / "gpu.lock")["ray"] == args["RAY_VERSION"]
    assert "[s3,ray]" in setup
    for _, argv in COMMANDS:
        if flag(argv, "--engine") == "ray":
            assert math.ceil(float(flag(argv, "--gpus-per-worker") or 1)) <= w["resources"]["GPU"]


def test_command_extraction() -> None:
    text = (
        "kubectl get rayjob pnp-batch -w\n"
        "ray job submit --address http://localhost:8265 -- \\\n"
        "  pnp-batch run m.parquet --out o/ --engine ray && echo done\n"
        "AWS_PROFILE=x pnp-batch status o/  # counts\n"
    )
    assert commands_in_text(text) == [
        ["run", "m.parquet", "--out", "o/", "--engine", "ray"],
        ["status", "o/"],
    ]
    assert commands_in(["pnp-batch", "validate", "m.csv"]) == [["validate", "m.csv"]]
    assert commands_in({"labels": {"app": "pnp-batch"}, "image": IMAGE}) == []
