"""The promvae command: serve, backtest, check-config."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config.base import ConfigError
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

    b = sub.add_parser("backtest", help="replay the service on a CSV series: train on its head, "
                       "retrain and score all of it causally")
    b.add_argument("--input", metavar="FILE", help="timestamp,value CSV (default: stdin)")
    b.add_argument("--train-points", type=int, metavar="N",
                   help="train on the first N rows (default: min(floor(0.15 n), 750))")
    b.add_argument("--config.file", dest="config_file", metavar="FILE",
                   help="take window, model, retraining and calibration settings from this config")
    b.add_argument("--train-once", action="store_true",
                   help="train only on the head; by default retrain and calibrate as the service "
                        "does (retrain_every, history, adapt_after, calibration_span)")
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


def _backtest(args: argparse.Namespace, cfg: Config) -> int:
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
