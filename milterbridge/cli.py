"""Command line: ``milterbridge run | check-config | send``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import prometheus_client
import structlog
import trio

from . import __version__
from .app import CannotListen, run_until_signalled
from .config import (
    EMBEDDED_DEFAULT,
    Config,
    ConfigError,
    ServerConfig,
    load_config,
    parse_host_port,
)
from .listeners import ListenerSpecError, parse_listener
from .logs import configure_logging
from .send import Envelope, send_main

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
    run.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin HTTP listener (/metrics, /healthz, /readyz); '' turns it off; "
        "overrides [admin] listen",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", type=Path)

    send = commands.add_parser(
        "send", help="play the MTA against a milter and show what a message becomes"
    )
    send.add_argument("file", type=Path, metavar="FILE.eml")
    send.add_argument("--to", default="inet:127.0.0.1:8899", metavar="SPEC")
    send.add_argument("--from", dest="sender", default="sender@example.test", metavar="ADDR")
    send.add_argument("--rcpt", action="append", metavar="ADDR", help="repeatable")
    send.add_argument("--helo", default="client.test")
    send.add_argument("--client", default="127.0.0.1", metavar="IP")
    send.add_argument(
        "--macro", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )
    send.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
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
    if args.admin_listen is not None:
        if args.admin_listen:
            try:
                parse_host_port(args.admin_listen)
            except ValueError as exc:
                print(f"milterbridge: --admin-listen {exc}", file=sys.stderr)
                return EXIT_CONFIG
        config = msgspec.structs.replace(
            config, admin=msgspec.structs.replace(config.admin, listen=args.admin_listen)
        )
    # Each counter and histogram would also export a ``_created`` series in the classic text
    # format, doubling the series count for a timestamp nothing here reads.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    log.info("starting", version=__version__, config=source, listen=config.server.listen)
    failures: list[str] = []
    try:
        trio.run(run_until_signalled, config)
    except* (CannotListen, ListenerSpecError) as group:
        failures.extend(str(exc) for exc in _leaves(group))
    if failures:
        log.error("cannot_listen", error="; ".join(failures))
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"milterbridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: ok ({config.summary()})")
    return EXIT_OK


def _send(args: argparse.Namespace) -> int:
    try:
        raw = args.file.read_bytes()
        parse_listener(args.to)
    except (OSError, ListenerSpecError) as exc:
        print(f"milterbridge send: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    macros = []
    for item in args.macro:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"milterbridge send: --macro {item!r}: expected NAME=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        macros.append((name.encode(), value.encode()))
    envelope = Envelope(
        sender=args.sender.encode(),
        recipients=[r.encode() for r in args.rcpt or ["recipient@example.test"]],
        helo=args.helo.encode(),
        client_ip=args.client,
        macros=macros,
    )
    return send_main(args.to, envelope, raw, args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "send":
        return _send(args)
    return _check_config(args)


__all__ = ["Config", "ServerConfig", "main"]
