"""Command line: ``milterbridge run | check-config``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import structlog
import trio

from . import __version__
from .app import run_until_signalled
from .config import EMBEDDED_DEFAULT, Config, ConfigError, ServerConfig, load_config
from .listeners import ListenerSpecError, parse_listener
from .logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milterbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"milterbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the milter proxy")
    run.add_argument("--config", type=Path, help="TOML config file (default: embedded default)")
    run.add_argument(
        "--listen",
        action="append",
        metavar="SPEC",
        help="inet:HOST:PORT, inet6:[ADDR]:PORT or unix:PATH; repeatable; overrides the config",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", type=Path)
    return parser


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    log = structlog.get_logger("milterbridge")
    config = EMBEDDED_DEFAULT
    source = "embedded default"
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"milterbridge: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        source = str(args.config)
    if args.listen:
        try:
            for spec in args.listen:
                parse_listener(spec)
        except ListenerSpecError as exc:
            print(f"milterbridge: --listen {exc}", file=sys.stderr)
            return EXIT_CONFIG
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, listen=list(args.listen))
        )
    log.info("starting", version=__version__, config=source, listen=config.server.listen)
    try:
        trio.run(run_until_signalled, config)
    except OSError as exc:
        log.error("cannot_listen", error=str(exc))
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"milterbridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: ok (listen: {', '.join(config.server.listen)})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _check_config(args)


__all__ = ["Config", "ServerConfig", "main"]
