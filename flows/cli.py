"""The `panelforge` command line: one subcommand per flow, plus dataset inspection.

    panelforge --help
    panelforge build-panels --config configs/tiny.yaml panels.source.count=32
    panelforge datasets show out/tiny/panels
    panelforge datasets repair out/tiny/panels

Every flow subcommand takes a YAML config and KEY=VALUE overrides (parsed as YAML values).
The whole config is validated and the stage's preflight run (tasks/config.py: check_config)
before the flow is called: a bad config is reported in one line per problem, naming its file and
field, and exits with status 2, with nothing written and no Prefect flow run created. The flow
is given the validated settings (its typed `config` parameter), never the raw overrides, so a
refused value (a URI with a secret in it) never reaches Prefect's database.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any

DEFAULT_CONFIG = "configs/tiny.yaml"

# subcommand -> (module, flow function, one-line help)
FLOWS: dict[str, tuple[str, str, str]] = {
    "build-panels": ("flows.build_panels", "build_panels", "build dual-panel datasets from sources (step 1)"),
    "pretokenize": ("flows.pretokenize", "pretokenize", "encode panels into token shards with MoVQGAN (step 2)"),
    "train": ("flows.train", "train", "train the decoder stage by stage (step 3)"),
    "generate": ("flows.generate", "generate", "generate image pairs in bulk (step 4)"),
    "evaluate": ("flows.evaluate", "evaluate", "control F1, depth RMSE, caption agreement of generated pairs (step 5)"),
    "retrain": ("flows.retrain", "retrain", "the whole pipeline end to end: panels, tokens, training, generation, evaluation"),
}


def _env_defaults() -> None:
    # Nothing may download at run time; no telemetry.
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Ray with token authentication: in-process Ray makes its own token; a cluster's comes
        # from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (docs/deployments.md).
        "RAY_AUTH_MODE": "token",
        "TOKENIZERS_PARALLELISM": "false",
        # The temporary local server of Prefect's local mode needs more than its default 20 s
        # to start on a busy 2-core laptop.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }.items():
        os.environ.setdefault(key, value)


def _print_summary(summary: Any) -> None:
    print(json.dumps(summary, indent=2, default=str))
    if isinstance(summary, dict):
        for key in ("contact_sheet", "report", "output", "dataset"):
            if summary.get(key):
                print(f"{key.replace('_', ' ')}: {summary[key]}")


# subcommand -> its config checks that need neither data nor Ray (a ConfigError names the field)
PREFLIGHT: dict[str, tuple[str, str]] = {
    "generate": ("tasks.generate.job", "preflight"),
    "retrain": ("tasks.generate.job", "preflight"),  # it ends with a generate step
}


def run_flow(command: str, config: str, overrides: list[str]) -> dict:
    from tasks.config import check_config, load_config

    # Every config error before a flow run exists or Ray starts; the flow gets the typed settings.
    cfg = check_config(load_config(config, overrides), command)
    if command in PREFLIGHT:
        module, func = PREFLIGHT[command]
        getattr(importlib.import_module(module), func)(cfg)
    module, func, _ = FLOWS[command]
    flow = getattr(importlib.import_module(module), func)
    return flow(config=cfg)


def _datasets(args: argparse.Namespace) -> int:
    """`panelforge datasets show|repair|export`."""
    if args.datasets_command == "export":
        from storage.export import export_dataset

        print(json.dumps(export_dataset(args.path, args.out, args.format, args.row_group_mb), indent=2))
        return 0
    if args.datasets_command == "repair":
        from storage.repair import describe, repair

        report = repair(args.path)
        print(json.dumps(report, indent=2) if args.json else describe(report))
        return 0
    _show_dataset(args.path, args.verify, args.json, args.sha256)
    return 0


def _show_dataset(path: str, verify: bool, as_json: bool, sha256: bool = False) -> None:
    from storage import open_dataset

    ds = open_dataset(path)
    if sha256:  # for publishing: the lines `sha256sum -c` reads, run in the dataset's folder
        for name, digest in ds.sha256s():
            print(f"{digest}  {name}")
        return
    if verify:
        checked = ds.verify()
    info = ds.summary()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"dataset   {info['uri']}")
    print(f"kind      {info['kind']} ({info['status']})")
    print(f"rows      {info['rows']:,}")
    print(f"bytes     {info['bytes']:,}")
    print(f"shards    {info['shards']}")
    print(f"made by   {info['code_version']}")
    if verify:
        print(f"verified  {checked} files, every content hash matches")
    if info["meta"]:
        print("meta      " + ", ".join(f"{k}={v}" for k, v in sorted(info["meta"].items())))
    print("rows per task")
    for task, n in sorted(info["rows_per_task"].items()):
        print(f"  {task:<24} {n:>10,}")
    print(f"rejects   {info['rejects']:,}")
    for reason, n in sorted(info["rejects_per_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<24} {n:>10,}")
    print("lineage")
    _print_lineage(info["inputs"], "  ")
    if not info["inputs"]:
        print("  (no inputs: a source dataset)")


def _print_lineage(inputs: list[dict], indent: str) -> None:
    for entry in inputs:
        print(f"{indent}<- {entry.get('kind')} {entry.get('uri')} ({entry.get('rows', 0):,} rows, digest {entry.get('digest')})")
        _print_lineage(entry.get("inputs", []), indent + "   ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panelforge",
        description="PanelForge: dual-panel datasets, MoVQGAN tokens, staged training and bulk SJD "
        "generation for Lumina-mGPT 2.0 style models, as Prefect flows running Ray jobs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, text) in FLOWS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.workers=4")
    demo = sub.add_parser(
        "demo",
        help="the embedded default: retrain end to end on the synthetic shapes dataset",
        description="Runs `retrain` with configs/tiny.yaml: Prefect local, Ray in-process, local files.",
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    ds = sub.add_parser("datasets", help="inspect and repair datasets", description="Inspect and repair PanelForge datasets.")
    ds_sub = ds.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    show = ds_sub.add_parser(
        "show",
        help="kind, rows, bytes, shards, rows per task, rejects per reason, lineage",
        description="Print a dataset's manifest summary: kind, rows, bytes, shards, rows per task, "
        "rejects per reason and lineage.",
    )
    show.add_argument("path", help="dataset folder or URI (s3://bucket/prefix)")
    show.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    show.add_argument("--sha256", action="store_true", help="print every file's sha256 (sha256sum format), for publishing")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    export = ds_sub.add_parser(
        "export",
        help="write a dataset as Parquet (zstd) that duckdb, Spark, pandas and datasets read",
        description="Export a dataset to Parquet: OUT/data/*.parquet, OUT/rejects.parquet, OUT/manifest.json "
        "(docs/data.md).",
    )
    export.add_argument("path", help="dataset folder or URI")
    export.add_argument("--format", default="parquet", choices=["parquet"])
    export.add_argument("--row-group-mb", type=float, default=64, help="uncompressed MiB per row group (default 64)")
    export.add_argument("out", help="output folder or URI")
    repair = ds_sub.add_parser(
        "repair",
        help="drop the units whose files are missing or corrupt; a rerun of the job redoes them",
        description="Re-hash every file of a dataset and drop from its manifest each unit with a missing, "
        "damaged or symlinked file (reported); then rerun the job that made it: it redoes exactly those units.",
    )
    repair.add_argument("path", help="dataset folder or URI (s3://bucket/prefix)")
    repair.add_argument("--json", action="store_true", help="machine-readable report")
    cmp = sub.add_parser(
        "compare",
        help="two evaluated runs figure by figure: better, worse or within noise",
        description="Compare the per-row figures (figures.jsonl) of evaluated generated datasets: BASE ... --vs NEW ...; "
        "rows of the same input are paired (tasks/evaluate/compare.py).",
    )
    from tasks.evaluate.compare import add_arguments

    add_arguments(cmp)
    cfg = sub.add_parser("config", help="print the resolved config", description="Validate and print a config.")
    cfg.add_argument("--config", default=DEFAULT_CONFIG)
    cfg.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    from tasks import quiet_broken_pipe

    return quiet_broken_pipe(_main, argv)


def _main(argv: list[str] | None) -> int:
    _env_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from storage import StorageError
    from tasks.config import ConfigError, load_config
    from tasks.generate.requests import RequestError

    try:
        if args.command == "datasets":
            return _datasets(args)
        elif args.command == "compare":
            from tasks.evaluate.compare import run

            return run(args)
        elif args.command == "config":
            print(json.dumps(load_config(args.config, args.overrides).model_dump(), indent=2))
        elif args.command == "demo":
            _print_summary(run_flow("retrain", DEFAULT_CONFIG, args.overrides))
        else:
            _print_summary(run_flow(args.command, args.config, args.overrides))
    except (ConfigError, StorageError, RequestError) as e:
        print(f"panelforge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
