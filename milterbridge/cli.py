"""Command line: ``milterbridge run | check-config | send | bench`` and the admin API's verbs
``get | create | query | update | delete`` (milterbridge/admin_client.py)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import prometheus_client
import structlog
import trio

from . import __version__
from .admin.store import FilterStore
from .admin_client import ADMIN_COMMANDS, add_admin_commands, run_admin_command
from .app import ABANDON_SECONDS, CannotListen, ConfigSource, offset_port, run_until_signalled
from .bench import add_bench_command, run_bench
from .config import (
    Config,
    ConfigError,
    ServerConfig,
    load_config,
    parse_host_port,
)
from .hardening import apply_core_dump_policy
from .listeners import ListenerSpecError, parse_listener
from .logs import configure_logging
from .send import Envelope, send_main
from .workers import STOP_GRACE, ReservationError, Supervisor, reserve_listeners

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
    run.add_argument(
        "--allow-core-dumps",
        action="store_true",
        help="leave core dumps on (they hold the secrets); by default the service sets its core "
        "size limit to 0 and makes itself non-dumpable",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the milter listeners (default 1: no supervisor); "
        "worker i serves the admin listener on its port + i",
    )
    # Internal: how the supervisor (milterbridge/workers.py) starts each worker.
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-listeners", help=argparse.SUPPRESS)
    run.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)

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
    add_admin_commands(commands)
    add_bench_command(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    if args.worker_index is not None:
        # Every line of a worker says which one it is (its admin port is the base + index).
        structlog.contextvars.bind_contextvars(worker_index=args.worker_index)
    log = structlog.get_logger("milterbridge")
    # Before the configuration is read: from there on the process holds its secrets.
    apply_core_dump_policy(allow=args.allow_core_dumps)
    if args.workers < 1:
        print(f"milterbridge: --workers {args.workers}: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.listen:
        try:
            for spec in args.listen:
                parse_listener(spec)
        except ListenerSpecError as exc:
            print(f"milterbridge: --listen {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.admin_listen:
        try:
            parse_host_port(args.admin_listen)
        except ValueError as exc:
            print(f"milterbridge: --admin-listen {exc}", file=sys.stderr)
            return EXIT_CONFIG
    source = ConfigSource(
        path=args.config,
        listen=tuple(args.listen) if args.listen else None,
        admin_listen=args.admin_listen,
        admin_offset=args.worker_index or 0,
    )
    try:
        config = source.load()
        if args.workers > 1 and config.admin.listen:
            offset_port(config.admin.listen, args.workers - 1)  # the last worker's port exists
        # A broken state file of the admin API stops the start like a broken config file.
        store = FilterStore.open(config)
    except ConfigError as exc:
        print(f"milterbridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    described = "embedded default" if args.config is None else str(args.config)
    # Each counter and histogram would also export a ``_created`` series in the classic text
    # format, doubling the series count for a timestamp nothing here reads.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    failures: list[str] = []
    try:
        if args.workers > 1 and args.worker_index is None:
            log.info(
                "starting",
                version=__version__,
                config=described,
                listen=config.server.listen,
                workers=args.workers,
            )
            trio.run(_supervise, args, source, config)
        else:
            inherited = None
            if args.worker_index is not None:
                inherited = msgspec.json.decode(args.worker_listeners or "{}", type=dict[str, str])
                if inherited:
                    config = _pin_listeners(config, list(inherited))
            log.info("starting", version=__version__, config=described, listen=config.server.listen)
            trio.run(
                functools.partial(
                    run_until_signalled,
                    config,
                    source,
                    inherited=inherited,
                    supervisor_pid=args.supervisor_pid,
                    ready=None if args.worker_ready_fd is None else _ready(args.worker_ready_fd),
                    store=store,
                )
            )
    except* (CannotListen, ListenerSpecError) as group:
        failures.extend(str(exc) for exc in _leaves(group))
    if failures:
        log.error("cannot_listen", error="; ".join(failures))
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


def _ready(fd: int) -> Callable[[], None]:
    """Tell the supervisor, through the pipe it gave us, that this worker is ready."""

    def ready() -> None:
        try:
            os.write(fd, b"r")
        except OSError:
            pass  # the supervisor is gone; the worker notices and stops by itself
        finally:
            os.close(fd)

    return ready


def _pin_listeners(config: Config, specs: list[str]) -> Config:
    """A worker listens where its supervisor reserved, whatever the file says by now."""
    if config.server.listen == specs:
        return config
    structlog.get_logger("milterbridge").warning(
        "config_reload_partial",
        not_applied=["server.listen"],
        reason="needs a restart (the supervisor holds the listeners)",
    )
    return msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, listen=specs)
    )


async def _supervise(args: argparse.Namespace, source: ConfigSource, config: Config) -> None:
    """The parent of ``--workers N`` (milterbridge/workers.py)."""
    log = structlog.get_logger("milterbridge")
    try:
        reservation = await reserve_listeners(
            config.server.listen, int(config.server.socket_mode, 8)
        )
    except ReservationError as exc:
        raise CannotListen(str(exc)) from exc
    deadline = float(config.server.drain_deadline)

    def reread() -> None:
        # The workers reload the file and log the outcome; the parent only needs the new
        # drain deadline, to give them the time it allows before killing one that hangs.
        nonlocal deadline
        with contextlib.suppress(ConfigError):
            deadline = float(source.load().server.drain_deadline)

    def command(index: int, ready_fd: int) -> list[str]:
        return _worker_command(args, index, reservation.plan, ready_fd)

    supervisor = Supervisor(
        command,
        args.workers,
        pass_fds=reservation.pass_fds,
        stop_timeout=lambda: deadline + ABANDON_SECONDS + STOP_GRACE,
        on_reload=reread,
        on_stop=reservation.close,
    )
    log.info("supervising", workers=args.workers, listeners=reservation.plan)
    try:
        await supervisor.run()
    finally:
        reservation.close()


def _worker_command(
    args: argparse.Namespace, index: int, plan: dict[str, str], ready_fd: int
) -> list[str]:
    """Worker ``index``'s command line: the parent's own options, plus where to listen."""
    command = [sys.executable, "-m", "milterbridge", "run"]
    if args.config is not None:
        command += ["--config", str(args.config)]
    for spec in args.listen or ():
        command += ["--listen", spec]
    if args.admin_listen is not None:
        command += ["--admin-listen", args.admin_listen]
    command += ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.allow_core_dumps:
        command.append("--allow-core-dumps")
    command += ["--worker-index", str(index), "--worker-ready-fd", str(ready_fd)]
    command += ["--supervisor-pid", str(os.getpid())]
    command += ["--worker-listeners", msgspec.json.encode(plan).decode()]
    return command


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        config = FilterStore.open(config).merged(config)  # the API's filters count too
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
    if args.command in ADMIN_COMMANDS:
        return run_admin_command(args)
    if args.command == "bench":
        return run_bench(args)
    return _check_config(args)


__all__ = ["Config", "ServerConfig", "main"]
