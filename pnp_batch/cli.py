"""The `pnp-batch` command: parses, calls one function per verb, sets exit codes."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence

from pnp_batch import __version__
from pnp_batch.errors import ClusterLost, UsageError

log = logging.getLogger("pnp_batch")

EPILOG = """exit status: 0 every row done (now or in an earlier run); 1 the run finished but some rows
failed (each recorded with its reason), or it stopped because the output store was unreachable past
--outage-timeout; 2 the request itself is unusable, or another run holds the output's lease (nothing
is written); 3 the run was stopped by its infrastructure (Ray cluster or node lost, no worker within
--worker-timeout): nothing is wrong with the rows; 130 / 143 stopped by SIGINT / SIGTERM (re-run the
same command to finish the rest)."""
EVAL_EPILOG = """exit status: 0 every ok row scored (now or earlier); 1 some rows could not be scored (each recorded
in OUT/eval/ with its reason); 2 the request is unusable (no results in OUT, a metric model that cannot be
loaded, a bad --set): nothing is written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors exit 2 as well, with our wording
        self.print_usage(sys.stderr)
        self.exit(2, f"pnp-batch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pnp-batch", description="Plug-and-Play diffusion image translation over datasets.",
                epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"pnp-batch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="translate every row of a manifest", epilog=EPILOG)
    r.add_argument("manifest", help="Parquet/CSV/JSONL file, folder or prefix of Parquet files; local or s3://...")
    r.add_argument("--out", required=True, help="output folder or object-store prefix")
    r.add_argument("--pipeline", default="sd21-base", help="preset name (pipelines/) or YAML file; default sd21-base")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline key (repeatable), e.g. --set inversion_steps=999")
    r.add_argument("--engine", choices=("local", "ray"), default="local", help="local (one process) or ray")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto' = running cluster); "
                   "default: start a local Ray instance")
    r.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, or CPUs/2)")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray actor (default 1 with GPUs)")
    r.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="Ray: stop the run (exit 3) when no worker is alive and ready for this long "
                   "(default 900: time for an autoscaler to add a GPU node and load the model)")
    r.add_argument("--features", default=None, help="feature store URI (default OUT/features); shareable")
    r.add_argument("--limit", type=int, default=None, help="only the first N manifest rows")
    r.add_argument("--overwrite", action="store_true", help="redo every row, done or not, under this config")
    r.add_argument("--keep-done", action="store_true",
                   help="when OUT holds rows done under another pipeline config, keep them and do only the rows "
                   "never done (without it, or --overwrite, such a run exits 2; docs/resume.md)")
    r.add_argument("--dry-run", action="store_true", help="validate and plan; load no model")
    r.add_argument("--no-report", action="store_true", help="skip the contact sheet")
    r.add_argument("--eval", action="store_true",
                   help="score each row in the worker right after decoding (CLIP score, structure distance) "
                   "into OUT/eval/; the metric models are the keys eval_clip_model / eval_dino_model")
    r.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="expand every row into a grid over this key's values (repeatable; e.g. "
                   "--sweep pnp_f_t=0.4,0.6,0.8); see docs/sweeps.md")
    r.add_argument("--yes", action="store_true", help="run a sweep of more than 10,000 settings per row")
    r.add_argument("--fallback-pipeline", default=None, metavar="NAME",
                   help="if the pipeline's model cannot be loaded here (no weights, no hub), say so and run this "
                   "pipeline instead (the README's demo uses 'tiny')")
    _policy_flags(r)
    r.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (repeatable), e.g. client_kwargs.region_name=eu-west-1")
    r.add_argument("--wait-for-lease", nargs="?", type=float, const=math.inf, default=None, metavar="SECONDS",
                   help="when another run holds the output's lease, wait for it (up to SECONDS; no value: no "
                   "limit) instead of exiting 2")
    r.add_argument("--lease-ttl", type=float, default=None, metavar="SECONDS",
                   help="the output lease expires this long after its last renewal (renewed every TTL/3); "
                   "default 120: how long a crashed run's output stays locked")
    r.add_argument("--grace-seconds", type=float, default=None, metavar="SECONDS",
                   help="after SIGTERM/SIGINT, time for the work in flight to finish (default 30)")
    r.add_argument("--outage-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long the run pauses while the output store is unreachable before it stops "
                   "(exit 1, rows in flight left pending); default 600, 0 = do not wait")

    e = sub.add_parser("eval", help="score the ok rows of an output not scored yet (CLIP score, structure "
                       "distance) into OUT/eval/", epilog=EVAL_EPILOG)
    e.add_argument("out", help="an output of pnp-batch run (folder or object-store prefix)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="eval_clip_model, eval_clip_revision, eval_dino_model, eval_dino_revision, device, dtype "
                   "(default: the latest run's)")
    e.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (this process) or ray (Ray Data, an actor pool holding the metric models)")
    e.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto' = running cluster)")
    e.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, or CPUs/2)")
    e.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray actor (default 1 with GPUs)")
    e.add_argument("--limit", type=int, default=None, help="score at most N rows")
    e.add_argument("--overwrite", action="store_true", help="score rows again that already have a score")
    _policy_flags(e)
    e.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    v = sub.add_parser("validate", help="check a manifest without loading a model")
    v.add_argument("manifest")
    v.add_argument("--check-images", action="store_true", help="also open every image")
    v.add_argument("--max-pixels", type=int, default=64_000_000)
    _policy_flags(v)
    v.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    rp = sub.add_parser("report", help="write the trade-off plot, the sweep contact sheet and the browsable page "
                        "(OUT/report/index.html) of an output; --sort draws the chosen rows' contact sheet")
    rp.add_argument("out")
    rp.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    from pnp_batch.report.options import add_report_args  # the selection and page options (docs/export.md)

    add_report_args(rp)

    x = sub.add_parser("export", help="write the rows that pass a filter as a training set (webdataset, parquet, "
                       "imagefolder); see docs/export.md")
    from pnp_batch.export.cli import add_export_args

    add_export_args(x)

    s = sub.add_parser("status", help="done / failed / pending counts of an output")
    s.add_argument("out")
    s.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    f = sub.add_parser("features", help="PCA views of the decoder features and self-attention of chosen rows "
                                        "(docs/features.md)")
    f.add_argument("source", help="a manifest, or an OUT of pnp-batch run (its sources and outputs)")
    f.add_argument("--ids", required=True, help="comma-separated row ids")
    f.add_argument("--out", required=True, help="folder for the figures (and --save's numbers)")
    f.add_argument("--layers", default=None, help="decoder layer numbers, e.g. 4-11 or 1,4,7 (default: all)")
    f.add_argument("--timesteps", default=None,
                   help="comma-separated timesteps (the nearest of the schedule; default: 5 spread over it)")
    f.add_argument("--save", action="store_true", help="also write the features, components and explained "
                   "variance (OUT/pca/*.npz, pca.parquet)")
    f.add_argument("--max-fit-tokens", type=int, default=20_000,
                   help="tokens each PCA of features, queries and keys is fit on (all are projected)")
    f.add_argument("--max-fit-attention-tokens", type=int, default=1_024,
                   help="tokens each PCA of attention rows is fit on (a row has one column per token)")
    f.add_argument("--pipeline", default=None, help="default: the OUT's run config, or sd21-base for a manifest")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--fallback-pipeline", default=None, metavar="NAME")
    f.add_argument("--features", default=None, help="feature store (default OUT/features, or --out's features/)")
    _policy_flags(f)
    f.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    m = sub.add_parser("make-test-model", help="write the offline tiny test model (diffusers format)")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--arch", choices=("sd", "sdxl"), default="sd",
                   help="sd: the `tiny` model (SD's topology); sdxl: `tiny-sdxl` (SDXL base's topology)")
    m.add_argument("--ip-adapter", action="store_true",
                   help="also write a random-weight IP-Adapter and image encoder for it in DIR/ip_adapter")

    from pnp_batch.masks.pie_bench import add_manifest_args

    add_manifest_args(sub)  # pnp-batch manifest from-pie-bench (docs/masks.md)

    from pnp_batch.bench.options import add_bench_args

    add_bench_args(sub)  # pnp-batch bench: bench/options.py
    return p


def _policy_flags(p: argparse.ArgumentParser) -> None:
    """The input policy's options (io/policy.py; docs/inputs.md), on every command that reads rows."""
    p.add_argument("--allow-uri", action="append", default=[], metavar="PREFIX",
                   help="also let rows read URIs starting with PREFIX (repeatable): a folder outside the "
                        "manifest's, an fsspec scheme (gs://), or an internal URL (http://10.0.0.5:9000/bucket/)")
    p.add_argument("--allow-private-network", action="store_true",
                   help="let rows fetch http(s) from private, loopback and link-local addresses too")


def _with_policy(cfg, a: argparse.Namespace):
    """``cfg`` with the command line's --allow-uri / --allow-private-network added to its policy keys."""
    return cfg.replace(allow_uri=tuple(dict.fromkeys((*cfg.allow_uri, *a.allow_uri))),
                       allow_private_network=cfg.allow_private_network or a.allow_private_network)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pnp_batch.io.credentials import redact_logs

    redact_logs()  # no URI password or signature in any log line
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "aiobotocore", "filelock", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _storage(items: list[str]) -> dict:
    from pnp_batch.io import storage

    opts = storage.merge_options(items)
    storage.configure(opts)
    return opts


def cmd_run(a: argparse.Namespace) -> int:
    from pnp_batch.config import load_config
    from pnp_batch.engines.plan import RunRequest, plan
    from pnp_batch.io.lease import MIN_TTL

    opts = _storage(a.storage_option)
    cfg = load_config(a.pipeline, a.overrides)
    if a.fallback_pipeline and not a.dry_run:
        from pnp_batch.models.load import model_available

        why = model_available(cfg)
        if why is not None:
            fallback = load_config(a.fallback_pipeline, a.overrides)
            print(
                f"pnp-batch: the weights of pipeline {cfg.name!r} are not available here: {why}.\n"
                f"pnp-batch: falling back to pipeline {fallback.name!r} (model {fallback.model!r})"
                + (": a random-weight TEST model; its outputs show the plumbing, not quality." if fallback.model
                   == "tiny" else "."),
                file=sys.stderr,
            )
            cfg = fallback
    if a.limit is not None and a.limit < 0:
        raise UsageError("--limit must be >= 0")
    if a.workers is not None and a.workers < 1:
        raise UsageError("--workers must be >= 1")
    if a.gpus_per_worker is not None and a.gpus_per_worker < 0:
        raise UsageError("--gpus-per-worker must be >= 0")
    for flag, value in (("--lease-ttl", a.lease_ttl), ("--grace-seconds", a.grace_seconds),
                        ("--outage-timeout", a.outage_timeout), ("--wait-for-lease", a.wait_for_lease)):
        if value is not None and not value >= 0:
            raise UsageError(f"{flag} must be a number of seconds >= 0")
    if a.lease_ttl is not None and a.lease_ttl < MIN_TTL:
        raise UsageError(f"--lease-ttl must be at least {MIN_TTL:g} seconds")
    if a.worker_timeout is not None and not a.worker_timeout > 0:
        raise UsageError("--worker-timeout must be > 0 seconds")
    from pnp_batch.io.sweep import parse_sweeps

    cfg = _with_policy(cfg, a)
    sweep = parse_sweeps(a.sweep, cfg, yes=a.yes)
    if a.overwrite and a.keep_done:
        raise UsageError("--overwrite and --keep-done contradict each other: give one")
    req = RunRequest(
        manifest=a.manifest, out=a.out, cfg=cfg, features=a.features, limit=a.limit, overwrite=a.overwrite,
        dry_run=a.dry_run, engine=a.engine, ray_address=a.ray_address, workers=a.workers,
        gpus_per_worker=a.gpus_per_worker, report=not a.no_report, storage_options=opts, eval=a.eval,
        wait_for_lease=a.wait_for_lease, outage_timeout=a.outage_timeout, sweep=sweep, keep_done=a.keep_done,
    )
    if a.lease_ttl is not None:
        req.lease_ttl = a.lease_ttl
    if a.grace_seconds is not None:
        req.grace_seconds = a.grace_seconds
    if a.dry_run:
        from pnp_batch.io.validate import validate_manifest

        # the same checks as `pnp-batch validate`, under this run's input policy: the same verdict
        checked = validate_manifest(a.manifest, max_pixels=cfg.max_pixels, policy=req.input_policy)
        _, _, p = plan(req)
        print(f"manifest: {a.manifest}\nrows: {p.total}\nalready done: {p.done_before}\nto do: {p.todo}"
              f"\nchanged since done: {p.changed}")
        if sweep is not None:
            print(f"sweep: {sweep.describe()}")
        print(f"pipeline: {cfg.name} (config {cfg.hash()}), model {cfg.model}, steps {cfg.steps}, "
              f"inversion_steps {cfg.inversion_steps}")
        print(f"output: {a.out}\nfeatures: {req.features_uri}\nengine: {a.engine}")
        if not checked.ok:
            print(checked.format())
            return 2
        return 0
    if a.engine == "ray":
        from pnp_batch.engines.ray import RayBackend

        backend = RayBackend() if a.worker_timeout is None else RayBackend(worker_timeout=a.worker_timeout)
    else:
        from pnp_batch.engines.local import LocalBackend

        backend = LocalBackend()
    from pnp_batch.engines.base import execute

    if cfg.model == "tiny":
        log.warning("pipeline model is 'tiny': a random-weight test model; outputs show the plumbing, not quality")
    return execute(req, backend)


def cmd_eval(a: argparse.Namespace) -> int:
    from pnp_batch.engines.evaluate import EvalRequest, evaluate

    if a.workers is not None and a.workers < 1:
        raise UsageError("--workers must be >= 1")
    opts = _storage(a.storage_option)
    return evaluate(EvalRequest(
        out=a.out, overrides=a.overrides, engine=a.engine, ray_address=a.ray_address, workers=a.workers,
        gpus_per_worker=a.gpus_per_worker, limit=a.limit, overwrite=a.overwrite, storage_options=opts,
        allow_uri=tuple(a.allow_uri), allow_private_network=a.allow_private_network,
    ))


def cmd_validate(a: argparse.Namespace) -> int:
    from pnp_batch.io.policy import InputPolicy
    from pnp_batch.io.validate import validate_manifest

    _storage(a.storage_option)
    policy = InputPolicy.for_manifest(a.manifest, a.allow_uri, a.allow_private_network)
    report = validate_manifest(a.manifest, check_images=a.check_images, max_pixels=a.max_pixels, policy=policy)
    print(report.format())
    return 0 if report.ok else 2


def _numbers(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise UsageError(f"{what} must be numbers or ranges like 4-11, got {text!r}") from None
    return list(dict.fromkeys(out))


def cmd_features(a: argparse.Namespace) -> int:
    from pnp_batch.inspect.run import FeaturesRequest, run_features

    _storage(a.storage_option)
    if min(a.max_fit_tokens, a.max_fit_attention_tokens) < 3:
        raise UsageError("--max-fit-tokens and --max-fit-attention-tokens must be at least 3")
    written = run_features(FeaturesRequest(
        source=a.source, ids=[i.strip() for i in a.ids.split(",") if i.strip()], out=a.out,
        layers=_numbers(a.layers, "--layers"), timesteps=_numbers(a.timesteps, "--timesteps"), save=a.save,
        pipeline=a.pipeline, overrides=a.overrides, fallback_pipeline=a.fallback_pipeline, features=a.features,
        max_fit=a.max_fit_tokens, max_fit_attention=a.max_fit_attention_tokens, allow_uri=tuple(a.allow_uri), allow_private_network=a.allow_private_network,
    ))
    for uri in written:
        print(uri)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from pnp_batch.io.status import status_report

    _storage(a.storage_option)
    from pnp_batch.io.metrics import format_score_stats, score_stats
    from pnp_batch.io.storage import exists

    if not exists(a.out):
        raise UsageError(f"output not found: {a.out} (nothing has been written there)")
    print(status_report(a.out).format())
    print(_lease_line(a.out))
    print(format_score_stats(score_stats(a.out)))
    return 0


def _lease_line(out: str) -> str:
    """Who is writing to OUT now, from its lease (read only: status takes no lease)."""
    from pnp_batch.io.lease import read_holder

    try:
        holder = read_holder(out)
    except OSError as e:
        from pnp_batch.io.storage import describe

        return f"lease: unreadable ({describe(e)})"
    if holder is None:
        return "lease: free (no run is writing)"
    if holder.expired():
        return f"lease: lapsed, left by {holder.describe()} (the next run takes it over)"
    return f"lease: held by {holder.describe()}"


def cmd_report(a: argparse.Namespace) -> int:
    from pnp_batch.report.write import write_sweep_reports

    _storage(a.storage_option)
    from pnp_batch.report.select import report_selection

    written = report_selection(a)  # the chosen rows' sheet (--sort ...) and OUT/report/index.html
    written += write_sweep_reports(a.out)
    if not written:
        print(f"nothing to report in {a.out}: no sweep results and no scores")
    for uri in written:
        print(uri)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from pnp_batch.export.cli import run_export

    return run_export(a, _storage(a.storage_option))


def cmd_make_test_model(a: argparse.Namespace) -> int:
    if a.arch == "sdxl":
        from pnp_batch.models.tiny_sdxl import make_tiny_sdxl

        path = make_tiny_sdxl(a.dir, seed=a.seed)
        print(f"wrote the tiny SDXL test model to {path} (use --set model={path} or --pipeline tiny-sdxl)")
    else:
        from pnp_batch.models.tiny import make_test_model

        path = make_test_model(a.dir, seed=a.seed)
        print(f"wrote the tiny test model to {path} (use --set model={path} or --pipeline tiny)")
    if a.ip_adapter:
        from pnp_batch.models.ip_adapter import write_test_ip_adapter

        ip = write_test_ip_adapter(path, seed=a.seed)
        print(f"wrote its test IP-Adapter to {ip} (use --set ip_adapter={ip})")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from pnp_batch.bench.options import run_bench_family

    return run_bench_family(a)


def cmd_manifest(a: argparse.Namespace) -> int:
    from pnp_batch.masks.pie_bench import cmd_manifest as convert

    return convert(a)


VERBS = {
    "run": cmd_run,
    "manifest": cmd_manifest,
    "eval": cmd_eval,
    "validate": cmd_validate,
    "status": cmd_status,
    "features": cmd_features,
    "report": cmd_report,
    "export": cmd_export,
    "make-test-model": cmd_make_test_model,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return VERBS[args.verb](args)
    except UsageError as e:
        from pnp_batch.io.storage import redact

        print(f"pnp-batch: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except ClusterLost as e:
        from pnp_batch.io.storage import redact

        print(f"pnp-batch: {redact(str(e))}", file=sys.stderr)
        return ClusterLost.EXIT_STATUS
    except KeyboardInterrupt:
        print("pnp-batch: interrupted; re-run the same command to finish the remaining rows", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
