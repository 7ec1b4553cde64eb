"""The promvae command: serve, backtest, check-config."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config.base import ConfigError
from .config.lint import query_warnings
from .config.settings import Config, describe, load_config
from .config.web import load_web_config

log = logging.getLogger("promvae")

_FLAG_KEYS = {"web_listen_address": "listen_address", "storage_path": "storage_path",
              "log_level": "log_level", "web_config_file": "web_config_file",
              "shard_count": "shard.count", "shard_index": "shard.index"}


def _setup_logging(level: str) -> None:
    level = {"warn": "warning"}.get(level.lower(), level.lower())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promvae", description="Per-series VAE anomaly detection "
                                "for Prometheus, Grafana and Alertmanager.")
    p.add_argument("--version", action="version", version=f"promvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the service (poll, train, serve /metrics)")
    s.add_argument("--config.file", dest="config_file", metavar="FILE",
                   help="YAML config (default: none; without prometheus.url the demo runs)")
    s.add_argument("--web.listen-address", dest="web_listen_address", metavar="ADDR",
                   help="address to serve on (default :8080)")
    s.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS and basic auth settings, as for Prometheus exporters (default none)")
    s.add_argument("--storage.path", dest="storage_path", metavar="DIR",
                   help="directory for models and the series index (default data)")
    s.add_argument("--log.level", dest="log_level", metavar="LEVEL",
                   help="debug, info, warn or error (default info)")
    s.add_argument("--shard.count", dest="shard_count", metavar="N",
                   help="spread the series over N instances (default 1)")
    s.add_argument("--shard.index", dest="shard_index", metavar="I",
                   help="this instance's shard, 0..N-1 (default: the ordinal of a StatefulSet "
                        "pod name such as promvae-2, from POD_NAME or the host name)")

    c = sub.add_parser("check-config", help="validate a config file and exit")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="also check this web config (TLS, basic auth)")
    c.add_argument("--probe", action="store_true",
                   help="also run each query against Prometheus: series, history available, "
                        "when training can start, what step or window that history supports")

    b = sub.add_parser(
        "backtest", help="replay the service on history: a query's series from Prometheus (or "
        "the demo) over a time range, or a CSV series", description="With --query or --expr: "
        "pull the query's history, train and retrain as the service would, and report flag "
        "episodes, time flagged and the worst incidents per series. Without: score a "
        "timestamp,value CSV (--input or stdin) and write per-row scores.")
    b.add_argument("--config.file", dest="config_file", metavar="FILE",
                   help="Prometheus, queries, step, history, model, retraining and calibration "
                        "settings (default: none; without prometheus.url the demo source)")
    b.add_argument("--query", metavar="NAME", help="backtest the configured query NAME")
    b.add_argument("--expr", metavar="PROMQL", help="backtest this expression instead")
    b.add_argument("--range", dest="range_", metavar="DURATION",
                   help="the range to report: this long, ending at --end (e.g. 7d)")
    b.add_argument("--start", metavar="TIME",
                   help="start of the range: unix seconds, RFC 3339, now-2d")
    b.add_argument("--end", metavar="TIME", help="end of the range (default now)")
    b.add_argument("--plot", metavar="FILE.png",
                   help="also write a PNG: observed, band, score and flags of the top series")
    b.add_argument("--top", type=int, metavar="N",
                   help="series in the plot, and incidents per series in the report (default 3)")
    b.add_argument("--input", metavar="FILE", help="CSV mode: timestamp,value CSV (default: stdin)")
    b.add_argument("--train-points", type=int, metavar="N",
                   help="CSV mode: train on the first N rows (default: min(floor(0.15 n), 750))")
    b.add_argument("--train-once", action="store_true",
                   help="train only once, before the range (CSV: on its head); by default retrain "
                        "and calibrate as the service does (retrain_every, history, adapt_after, "
                        "calibration_span)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.file, args.web_config_file, args.probe)
        overrides = {key: getattr(args, flag, None) for flag, key in _FLAG_KEYS.items()}
        cfg = load_config(getattr(args, "config_file", None), overrides=overrides)
    except ConfigError as e:
        print(f"promvae: {e}", file=sys.stderr)
        return 1
    _setup_logging(cfg.log_level)
    if args.command == "backtest":
        return _backtest(args, cfg)
    from .server import serve

    for warning in query_warnings(cfg):
        log.warning("%s", warning)

    return serve(cfg)


def _check_config(path: str, web_config_file: str | None = None, probe: bool = False) -> int:
    try:
        cfg = load_config(path, overrides={"web_config_file": web_config_file})
    except ConfigError as e:
        print(f"promvae: {e}", file=sys.stderr)
        return 1
    print(f"{path}: OK ({describe(cfg)})")
    if cfg.web_config_file:
        print(f"{cfg.web_config_file}: OK ({load_web_config(cfg.web_config_file).describe()})")
    for q in cfg.queries:
        print(f"  query {q.name}: {q.expr}")
    for warning in query_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    if not probe:
        return 0
    if cfg.demo:
        print("--probe: no prometheus.url configured (the demo needs no probe)")
        return 0
    from .probe import probe as run_probe
    from .probe import report

    print(f"probing {describe(cfg).split(',')[0]}:")
    lines, ok = report(cfg, run_probe(cfg))
    print("\n".join(lines))
    if not ok:
        print("promvae: the probe found problems (see above)", file=sys.stderr)
    return 0 if ok else 1


_QUERY_ONLY = ("range_", "start", "end", "plot", "top")


def _backtest(args: argparse.Namespace, cfg: Config) -> int:
    """`promvae backtest`: a query's history (--query/--expr) or a CSV series."""
    def flag(dest: str) -> str:
        return "--" + dest.rstrip("_").replace("_", "-")

    if args.query is not None or args.expr is not None:
        mixed = [flag(d) for d in ("input", "train_points") if getattr(args, d) is not None]
        if mixed:
            verb = "is" if len(mixed) == 1 else "are"
            return _usage(f"{' and '.join(mixed)} {verb} for CSV input, not for --query/--expr")
        return _backtest_query(args, cfg)
    given = [flag(d) for d in _QUERY_ONLY if getattr(args, d) is not None]
    if given:
        verb = "needs" if len(given) == 1 else "need"
        return _usage(f"{', '.join(given)} {verb} --query NAME or --expr PROMQL")
    return _backtest_csv(args, cfg)


def _usage(message: str) -> int:
    print(f"promvae backtest: {message}", file=sys.stderr)
    return 2


def _backtest_query(args: argparse.Namespace, cfg: Config) -> int:
    """Pull the query's history, replay the service, print the report (and write the plot)."""
    import time
    from pathlib import Path

    from .backtest import BacktestError, make_source, pick_query, run, time_range
    from .source.prometheus import SourceError

    def progress(message: str) -> None:
        print(f"promvae backtest: {message}", file=sys.stderr, flush=True)

    try:
        query = pick_query(cfg, args.query, args.expr)
        start, end = time_range(args.range_, args.start, args.end, time.time())
    except BacktestError as e:
        return _usage(str(e))
    top = 3 if args.top is None else args.top
    if top < 1:
        return _usage(f"--top must be at least 1, got {top}")
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        return _usage(f"--plot {args.plot}: no such directory")
    import torch

    # The service's setting: on a busy machine more threads per op cost more than they
    # give for models this small (a demo backtest: 14 s at 1 thread, 110 s at 2).
    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    from .service import allocator

    allocator.tune_for_training()  # the replay trains batches as the service does
    source = make_source(cfg)
    try:
        outcome = run(cfg, source, query, start, end, train_once=args.train_once,
                      progress=progress)
    except (BacktestError, SourceError) as e:
        print(f"promvae backtest: {e}", file=sys.stderr)
        return 1
    finally:
        source.close()
        torch.set_num_threads(threads)  # main() may run in-process (tests, embedding)
    from detector.report import format_report

    sys.stdout.write(format_report(outcome.report, worst=top))
    sys.stdout.flush()
    if args.plot is not None:
        from detector.plot import write_plot

        try:
            panels = write_plot(args.plot, outcome.report, outcome.results, top=top)
        except OSError as e:
            print(f"promvae backtest: cannot write {args.plot}: {e.strerror}", file=sys.stderr)
            return 1
        progress(f"wrote {args.plot}: {panels} panels, {panels // 2} series by peak score")
    return 0


def _backtest_csv(args: argparse.Namespace, cfg: Config) -> int:
    """Train on the head of a timestamp,value CSV and write per-row scores to stdout."""
    from detector.backtest import run_backtest_csv

    def progress(message: str) -> None:
        print(f"promvae backtest: {message}", file=sys.stderr)

    try:
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(open(args.input)) if args.input else sys.stdin
            incidents = run_backtest_csv(stream, sys.stdout, cfg.vae_config(),
                                         train_points=args.train_points, log=progress,
                                         deployment=None if args.train_once else cfg.deployment())
    except OSError as e:
        print(f"promvae backtest: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"promvae backtest: {e}", file=sys.stderr)
        return 1
    progress(f"{len(incidents)} incidents flagged")
    for first, last, peak in incidents:
        progress(f"  {first} .. {last}  peak score {peak:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
