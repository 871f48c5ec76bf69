"""Synchronous test harness: a private, throw-away Postfix instance plus smtp-sink on loopback.

Typical use (from a pytest fixture)::

    @pytest.fixture
    def postfix(tmp_path: Path) -> Iterator[PostfixInstance]:
        with PostfixInstance(tmp_path, milters=["inet:127.0.0.1:8899"]) as pf:
            yield pf

    def test_something(postfix: PostfixInstance) -> None:
        result = postfix.send("a@sender.test", ["b@rcpt.test"], make_message(...))
        assert result.accepted, result
        [msg] = postfix.wait_delivered(1)
        assert msg.header("X-Added") == "yes"

Layout and process model (all verified on Debian 12 / Postfix 3.7):

* Everything lives in one runtime directory: ``conf/`` (main.cf, master.cf), ``queue/``
  (queue_directory, layout created here exactly as ``post-install`` would, so ``postfix check``
  is not needed at start-up; see :meth:`PostfixInstance.check`), ``data/`` (data_directory),
  ``sink/`` (smtp-sink dump files), ``maillog`` (Postfix log, via postlogd).
  Postfix daemons must be able to traverse every parent directory of it; pytest's
  ``tmp_path`` is below a 0700 directory, so in that case the runtime directory is created
  below the system temp dir and ``<base_dir>/postfix`` is a symlink to it; on close the
  diagnostic files are copied back into ``<base_dir>/postfix`` and the runtime dir is removed.
* A tiny Python supervisor process (child subreaper) starts the Postfix ``master`` in the
  foreground and ``smtp-sink``; it reaps every process of the instance. Closing its stdin (or
  the test process dying) makes it SIGTERM both, so :meth:`PostfixInstance.close` knows for
  certain that every process is gone once the supervisor has exited.
* Postfix smtpd listens on ``127.0.0.1:<smtp_port>``, relays everything to
  ``[127.0.0.1]:<sink_port>`` (smtp-sink). No DNS, no chroot, no port 25.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pty
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import pytest

__all__ = [
    "DISCONNECTED",
    "POSTFIX_HOSTNAME",
    "PostfixInstance",
    "Reply",
    "SMTPSession",
    "SendResult",
    "SinkMessage",
    "make_message",
    "parse_sink_file",
    "require_postfix",
]

POSTFIX_BIN = "/usr/sbin/postfix"
POSTCONF_BIN = "/usr/sbin/postconf"
POSTQUEUE_BIN = "/usr/sbin/postqueue"
SMTP_SINK_BIN = "/usr/sbin/smtp-sink"
LOOPBACK = "127.0.0.1"
#: ``myhostname`` of every instance (appears in Postfix's Received header and the banner).
POSTFIX_HOSTNAME = "mta.test"
#: Reply code used in :class:`Reply` when the server closed the connection instead of replying.
DISCONNECTED = -1

_MAILLOG_TAIL_LINES = 60
_SINK_SUFFIX_RE = re.compile(r"^\d{14}\.[0-9a-f]{8}$")
_QUEUED_AS_RE = re.compile(r"queued as ([0-9A-Za-z]+)")
_CHILD_ENV_KEYS = ("TZ",)


# --------------------------------------------------------------------------------------------
# Dependency check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PostfixEnv:
    daemon_directory: Path
    postfix_uid: int
    postfix_gid: int
    postfix_groups: frozenset[int]
    postdrop_gid: int


@functools.cache
def _postfix_env() -> _PostfixEnv | str:
    """Return the Postfix installation facts, or a string describing what is missing."""
    missing = [
        p
        for p in (POSTFIX_BIN, POSTCONF_BIN, POSTQUEUE_BIN, SMTP_SINK_BIN)
        if not os.access(p, os.X_OK)
    ]
    if missing:
        return (
            f"missing executables: {', '.join(missing)} "
            "(Debian/Ubuntu: apt-get install postfix; smtp-sink ships with it)"
        )
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix master, smtp-sink -u postfix)"
    try:
        pw = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
    except KeyError as exc:
        return f"missing Postfix system user/group: {exc}"
    proc = subprocess.run(
        [POSTCONF_BIN, "-d", "-h", "daemon_directory"],
        capture_output=True,
        text=True,
        check=False,
        env=_child_env(),
    )
    daemon_dir = Path(proc.stdout.strip())
    if proc.returncode != 0 or not os.access(daemon_dir / "master", os.X_OK):
        return f"no Postfix master daemon (postconf: {proc.stdout!r} {proc.stderr!r})"
    groups = frozenset(os.getgrouplist("postfix", pw.pw_gid))
    return _PostfixEnv(daemon_dir, pw.pw_uid, pw.pw_gid, groups, postdrop)


def require_postfix() -> None:
    """Fail (never skip) the current test if Postfix/smtp-sink are not usable here."""
    env = _postfix_env()
    if isinstance(env, str):
        pytest.fail(f"Postfix integration tests cannot run: {env}", pytrace=False)


def _env() -> _PostfixEnv:
    env = _postfix_env()
    if isinstance(env, str):
        pytest.fail(f"Postfix integration tests cannot run: {env}", pytrace=False)
    return env


def _child_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    env.update({k: os.environ[k] for k in _CHILD_ENV_KEYS if k in os.environ})
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# SMTP client side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. ``code`` is :data:`DISCONNECTED` if the server hung up instead."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SendResult:
    """Replies for one mail transaction; nothing is raised for rejections.

    ``rcpts`` has one reply per recipient *attempted* (empty if MAIL failed).
    ``data_command`` is the reply to ``DATA`` (354 when accepted), ``data`` the final reply
    (after the terminating dot, or the DATA command's own rejection). Both are ``None`` when
    DATA was never sent (MAIL failed or every RCPT was rejected).
    """

    mail: Reply
    rcpts: tuple[Reply, ...] = ()
    data_command: Reply | None = None
    data: Reply | None = None

    @property
    def accepted(self) -> bool:
        """True if the server took responsibility for the message (250 after the dot)."""
        return self.data is not None and self.data.code == 250

    @property
    def queue_id(self) -> str | None:
        if self.data is None:
            return None
        m = _QUEUED_AS_RE.search(self.data.text)
        return m.group(1) if m else None

    @property
    def final(self) -> Reply:
        """The reply that decided the transaction's fate (last one received)."""
        if self.data is not None:
            return self.data
        if self.rcpts:
            return self.rcpts[-1]
        return self.mail


def make_message(headers: Iterable[tuple[str, str]], body: bytes | str) -> bytes:
    """Build wire-format message bytes (CRLF line ends) from a header list and a body.

    Header values may contain folded continuation lines (``"a\\r\\n b"`` or ``"a\\n b"``).
    Bare LFs in ``body`` are converted to CRLF.
    """
    lines = [f"{name}: {value}".encode() for name, value in headers]
    head = b"\r\n".join(lines).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raw_body = body.encode() if isinstance(body, str) else body
    raw_body = raw_body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return head + b"\r\n\r\n" + raw_body


def _dot_stuff(message: bytes) -> bytes:
    data = re.sub(rb"(?m)^\.", b"..", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class SMTPSession:
    """One SMTP connection to the private smtpd; send any number of messages over it.

    Protocol-level rejections and disconnects are captured as :class:`Reply` objects; only
    infrastructure trouble (cannot connect, client-side ``timeout``) raises ``AssertionError``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        helo: str = "client.test",
        timeout: float = 60.0,
        on_error: Callable[[str], NoReturn] | None = None,
        ehlo: bool = True,
    ) -> None:
        self.helo_name = helo
        self._fail = on_error or _raise_assertion
        self._smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout)
        self.closed = False
        try:
            code, text = self._smtp.connect(host, port)
        except OSError as exc:
            self._smtp.close()
            self.closed = True
            self._fail(f"cannot connect to smtpd at {host}:{port}: {exc!r}")
        self.greeting = Reply(code, _decode(text))
        self.ehlo_reply: Reply | None = None
        if ehlo:
            self.ehlo_reply = self.ehlo(helo)

    # -- low level ------------------------------------------------------------------------

    def command(self, verb: str, args: str = "") -> Reply:
        """Send one raw command (e.g. ``command("NOOP")``) and return its reply."""
        if self.closed:
            return Reply(DISCONNECTED, "not connected")
        try:
            self._smtp.putcmd(verb, args)
            code, text = self._smtp.getreply()
        except smtplib.SMTPServerDisconnected as exc:
            return self._disconnected(exc)
        return Reply(code, _decode(text))

    def ehlo(self, name: str | None = None) -> Reply:
        if self.closed:
            return Reply(DISCONNECTED, "not connected")
        try:
            code, text = self._smtp.ehlo(name or self.helo_name)
        except smtplib.SMTPServerDisconnected as exc:
            return self._disconnected(exc)
        return Reply(code, _decode(text))

    def xclient(self, **attrs: str) -> Reply:
        """Send ``XCLIENT NAME=.. ADDR=.. HELO=..`` (allowed from loopback) and re-EHLO.

        Lets a test pretend to be another client, e.g. ``xclient(ADDR="192.0.2.1",
        NAME="client.example")``; Postfix then tells the milter that client.
        """
        args = " ".join(f"{k.upper()}={v}" for k, v in attrs.items())
        reply = self.command("XCLIENT", args)
        if reply.code == 220:
            helo = attrs.get("HELO", attrs.get("helo", self.helo_name))
            self.ehlo_reply = self.ehlo(helo)
        return reply

    def rset(self) -> Reply:
        return self.command("RSET")

    # -- transactions -----------------------------------------------------------------------

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
    ) -> SendResult:
        """Run MAIL / RCPT* / DATA and capture every reply.

        ``message`` is sent as is (dot-stuffed, CRLF appended if missing): use CRLF line ends
        (see :func:`make_message`). ``sender`` may be ``""`` for the null sender.
        """
        if isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not a str")
        if any("SMTPUTF8" in o.upper() for o in mail_options):
            self._smtp.command_encoding = "utf-8"
        mail = self.command("MAIL", _with_options(f"FROM:<{sender}>", mail_options))
        if not mail.ok:
            return SendResult(mail=mail)
        rcpts: list[Reply] = []
        for rcpt in recipients:
            reply = self.command("RCPT", _with_options(f"TO:<{rcpt}>", rcpt_options))
            rcpts.append(reply)
            if reply.code == DISCONNECTED:
                return SendResult(mail=mail, rcpts=tuple(rcpts))
        if not any(r.ok for r in rcpts):
            self.rset()
            return SendResult(mail=mail, rcpts=tuple(rcpts))
        data_command = self.command("DATA")
        if data_command.code != 354:
            if data_command.code != DISCONNECTED:
                self.rset()
            return SendResult(mail, tuple(rcpts), data_command, data_command)
        try:
            self._smtp.send(_dot_stuff(message))
            code, text = self._smtp.getreply()
            data = Reply(code, _decode(text))
        except smtplib.SMTPServerDisconnected as exc:
            data = self._disconnected(exc)
        return SendResult(mail, tuple(rcpts), data_command, data)

    # -- teardown ---------------------------------------------------------------------------

    def quit(self) -> Reply:
        reply = self.command("QUIT")
        self.close()
        return reply

    def close(self) -> None:
        self.closed = True
        self._smtp.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            try:
                self.quit()
            except (OSError, smtplib.SMTPException):
                pass
        self.close()

    def _disconnected(self, exc: Exception) -> Reply:
        self.close()
        if isinstance(exc.__context__, TimeoutError):
            # smtplib turns a client-side socket timeout into SMTPServerDisconnected.
            self._fail(f"client timeout waiting for an SMTP reply: {exc}")
        return Reply(DISCONNECTED, f"connection closed by server ({exc})")


def _with_options(base: str, options: Sequence[str]) -> str:
    return " ".join([base, *options])


def _decode(text: bytes) -> str:
    return text.decode("utf-8", errors="replace")


def _raise_assertion(message: str) -> NoReturn:
    raise AssertionError(message)


# --------------------------------------------------------------------------------------------
# smtp-sink dump files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """A message as Postfix delivered it to smtp-sink.

    ``headers`` excludes smtp-sink's own lines (X-Client-Addr, X-Mail-Args, its Received...)
    and keeps Postfix's ``Received`` on top. Values are the text after ``Name:`` minus one
    leading space; folded headers keep their line breaks as ``"\\r\\n"`` plus the original
    leading whitespace. ``body`` uses CRLF line ends. smtp-sink drops every CR it receives,
    so bare CR/LF in the original cannot be distinguished from CRLF.
    """

    path: Path
    raw: bytes
    sender: str
    mail_args: str
    recipients: tuple[str, ...]
    rcpt_args: tuple[str, ...]
    client_addr: str
    helo: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def headers_except(self, *names: str) -> list[tuple[str, str]]:
        """The header list without the given names, e.g. ``headers_except("Received")``."""
        drop = {n.lower() for n in names}
        return [(n, v) for n, v in self.headers if n.lower() not in drop]

    @property
    def header_names(self) -> list[str]:
        return [n for n, _ in self.headers]


def _address(args: str) -> str:
    args = args.strip()
    if args.startswith("<"):
        end = args.find(">")
        return args[1:end] if end != -1 else args[1:]
    return args.split(None, 1)[0] if args else ""


def parse_sink_file(raw: bytes, path: Path = Path("<memory>")) -> SinkMessage:
    """Parse one ``smtp-sink -d`` dump file (format: smtp-sink(1) "DUMP FILE FORMAT")."""
    if not raw.endswith(b"\n"):
        raise ValueError(f"{path}: incomplete smtp-sink dump (no final newline)")
    lines = raw.split(b"\n")
    meta: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received: "):
        name, sep, value = lines[i].decode("utf-8", "surrogateescape").partition(": ")
        if not sep or not name.startswith("X-"):
            raise ValueError(f"{path}: unexpected smtp-sink line {lines[i]!r}")
        meta.setdefault(name, []).append(value)
        i += 1
    if i >= len(lines):
        raise ValueError(f"{path}: no smtp-sink Received header")
    i += 1
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    # The rest is the message content followed by one extra "\n" (the dump's final empty
    # line, really the LF of the terminating ".\r\n").
    content_lf = b"\n".join(lines[i:])[:-1]
    head_lf, blank, body_lf = content_lf.partition(b"\n\n")
    if not blank and not _looks_like_header(head_lf):
        head_lf, body_lf = b"", content_lf
    headers: list[tuple[str, str]] = []
    for line in head_lf.split(b"\n") if head_lf else []:
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value}\r\n{text}")
            continue
        name, _, value = text.partition(":")
        headers.append((name, value[1:] if value.startswith(" ") else value))
    mail_args = meta.get("X-Mail-Args", [""])[0]
    rcpt_args = tuple(meta.get("X-Rcpt-Args", []))
    helo = meta.get("X-Helo-Args")
    return SinkMessage(
        path=path,
        raw=raw,
        sender=_address(mail_args),
        mail_args=mail_args,
        recipients=tuple(_address(a) for a in rcpt_args),
        rcpt_args=rcpt_args,
        client_addr=meta.get("X-Client-Addr", [""])[0],
        helo=helo[0] if helo else None,
        headers=tuple(headers),
        body=body_lf.replace(b"\n", b"\r\n"),
        content=content_lf.replace(b"\n", b"\r\n"),
    )


def _looks_like_header(block: bytes) -> bool:
    first = block.split(b"\n", 1)[0]
    return re.match(rb"^[!-9;-~]+:", first) is not None


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

# Runs as a separate Python process. It becomes a child subreaper, starts the Postfix master
# (foreground, it makes itself a session leader) and smtp-sink, prints their pids, and reaps
# every process that ends up as its child (the master's children are re-parented to it when
# the master exits). EOF on stdin (harness closed it, or the test process died) or SIGTERM
# makes it SIGTERM both; it exits once it has no child left (removing the runtime directory
# if it lives outside base_dir and the test process is gone).
_SUPERVISOR = r"""
import ctypes, json, os, signal, sys, threading
spec = json.loads(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
def spawn(argv, cwd, log):
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            nul = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nul, 0); os.dup2(fd, 1); os.dup2(fd, 2)
            os.execve(argv[0], argv, spec["env"])
        finally:
            os._exit(127)
    return pid
pids = {name: spawn(**p) for name, p in spec["procs"].items()}
sys.stdout.write(json.dumps(pids) + "\n"); sys.stdout.flush()
def shutdown(*_):
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, shutdown)
def watch():
    sys.stdin.buffer.read()
    shutdown()
threading.Thread(target=watch, daemon=True).start()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
if spec["orphan_cleanup"] and os.getppid() != spec["parent"]:
    import shutil  # the test process died: nobody else will remove the runtime directory
    shutil.rmtree(spec["orphan_cleanup"], ignore_errors=True)
"""


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process, or None (gone or zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[0], int(fields[2])


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_state(int(entry))
            if st is not None and st[1] == pgid:
                found.append(int(entry))
    return found


def _listening_inode(port: int) -> int | None:
    """Socket inode of a TCP listener on 127.0.0.1:port (from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":
                return int(parts[9])
    return None


def _owns_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _run_on_pty(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run ``argv`` with stdout/stderr on a pseudo-terminal; return (exit code, output)."""
    master_fd, slave_fd = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd, env=_child_env()
        )
    finally:
        os.close(slave_fd)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(master_fd, 4096)
            except OSError:  # EIO: the child closed its end (exited)
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master_fd)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _traversable_by(path: Path, env: _PostfixEnv) -> bool:
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid == env.postfix_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in env.postfix_groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The instance
# --------------------------------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{smtpd_listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_QUEUE_DIRS_PRIVATE = (
    *("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming"),
    *("private", "saved", "trace"),
)
#: Queues holding mail that Postfix is still working on (not deferred, not on hold).
_BUSY_QUEUES = ("maildrop", "incoming", "active")


class PostfixInstance:
    """A private Postfix (smtpd on loopback) relaying everything to a private smtp-sink.

    ``milters`` become ``smtpd_milters`` (e.g. ``["inet:127.0.0.1:8899"]``; empty = none).
    ``main_cf`` entries are added to / override the generated main.cf (e.g.
    ``{"milter_default_action": "accept", "milter_command_timeout": "5s"}``); Postfix's own
    defaults apply to everything not set (milter_default_action = tempfail, protocol 6,
    milter_connect_timeout 30s, milter_command_timeout 30s, milter_content_timeout 300s).

    ``sink_options`` are extra smtp-sink(1) options (e.g. ``["-f", "RCPT"]`` to make the
    downstream reject recipients, ``["-w", "2"]`` to delay its DATA reply).

    A milter listening on a unix socket must be reachable by the ``postfix`` user: put the
    socket in :attr:`sockets_dir` with mode 0666, not under pytest's tmp_path (0700).
    :attr:`root` is only final after :meth:`start` (it may move out of ``base_dir``).
    """

    def __init__(
        self,
        base_dir: Path | str,
        milters: Sequence[str] = (),
        main_cf: Mapping[str, str | int | bool] | None = None,
        *,
        sink_options: Sequence[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.sink_options = list(sink_options)
        self.milters = list(milters)
        self.extra_main_cf = dict(main_cf or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = LOOPBACK
        self.smtp_port = 0
        self.sink_port = 0
        self.root = self.base_dir / "postfix"
        self._runtime_is_external = False
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._pids: dict[str, int] = {}
        self._closed = False
        self.timings: dict[str, float] = {}

    # -- paths ----------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def sink_dir(self) -> Path:
        return self.root / "sink"

    @property
    def sockets_dir(self) -> Path:
        """Directory (short path, reachable by the postfix user) for milter unix sockets;
        a socket created by root must still be chmod 0666 for smtpd to connect."""
        return self.root / "sockets"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    @property
    def syslog_name(self) -> str:
        return f"pftest{self.smtp_port}"

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Create the instance, start smtp-sink and Postfix, wait until both listen."""
        if self._supervisor is not None or self._closed:
            raise RuntimeError("PostfixInstance.start() may only be called once")
        t0 = time.monotonic()
        env = _env()
        try:
            self._prepare_dirs(env)
            self.sink_port = _free_port()
            self.smtp_port = _free_port()
            while self.smtp_port == self.sink_port:
                self.smtp_port = _free_port()
            self._write_config()
            self._spawn(env)
            self._wait_listening()
        except BaseException:
            self.close()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Stop Postfix and smtp-sink; afterwards none of their processes is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        try:
            self._stop_processes()
        finally:
            self._finish_runtime_dir()
        self.timings["stop"] = time.monotonic() - t0

    @property
    def running(self) -> bool:
        return (
            self._supervisor is not None
            and self._supervisor.poll() is None
            and all(_proc_state(pid) is not None for pid in self._pids.values())
        )

    def leftover_processes(self) -> list[int]:
        """Pids of this instance still alive (zombies excluded); for assertions after close()."""
        left: set[int] = set()
        groups = set(self._pids.values())
        if self._supervisor is not None:
            groups.add(self._supervisor.pid)  # its own process group; the sink shares it
        for pgid in groups:
            left.update(_processes_in_group(pgid))
        left.update(pid for pid in self._pids.values() if _proc_state(pid) is not None)
        return sorted(left)

    def _prepare_dirs(self, env: _PostfixEnv) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.root.exists() or self.root.is_symlink():
            raise RuntimeError(f"{self.root} already exists: one PostfixInstance per base_dir")
        if _traversable_by(self.base_dir, env):
            self.root.mkdir(mode=0o755)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="pftest-"))
            if not _traversable_by(tmp.parent, env):
                pytest.fail(
                    f"neither {self.base_dir} nor {tmp.parent} is traversable by the postfix "
                    "user; set TMPDIR to a world-traversable directory",
                    pytrace=False,
                )
            self.root.symlink_to(tmp, target_is_directory=True)
            self.root = tmp
            self._runtime_is_external = True
        self.root.chmod(0o755)
        # Queue layout exactly as post-install(1) creates it (postfix-files).
        queue = self.queue_dir
        queue.mkdir(mode=0o755)
        for name in _QUEUE_DIRS_PRIVATE:
            (queue / name).mkdir(mode=0o700)
            os.chown(queue / name, env.postfix_uid, -1)
        for name, mode in (("maildrop", 0o730), ("public", 0o710)):
            (queue / name).mkdir()
            (queue / name).chmod(mode)
            os.chown(queue / name, env.postfix_uid, env.postdrop_gid)
        (queue / "pid").mkdir(mode=0o755)
        self.data_dir.mkdir(mode=0o700)
        os.chown(self.data_dir, env.postfix_uid, env.postfix_gid)
        self.sink_dir.mkdir(mode=0o755)
        os.chown(self.sink_dir, env.postfix_uid, env.postfix_gid)
        self.config_dir.mkdir(mode=0o755)
        self.sockets_dir.mkdir(mode=0o755)

    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf settings this instance uses (defaults merged with ``main_cf``)."""
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "syslog_name": self.syslog_name,
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.root),
            "myhostname": POSTFIX_HOSTNAME,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery disabled",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "relayhost": f"[{LOOPBACK}]:{self.sink_port}",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Relay for everyone, including clients simulated with XCLIENT (the listener is
            # loopback-only); Postfix insists on a "reject" in the list.
            "smtpd_relay_restrictions": "permit_mynetworks, check_client_access static:OK, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # Keep tests fast and free of anti-abuse delays.
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "1000",
            "in_flow_delay": "0",
            "smtpd_milters": ", ".join(self.milters),
            "non_smtpd_milters": "",
        }
        for key, value in self.extra_main_cf.items():
            if isinstance(value, bool):
                settings[key] = "yes" if value else "no"
            else:
                settings[key] = str(value)
        return settings

    def master_cf_text(self) -> str:
        return _MASTER_CF.format(smtpd_listen=f"{LOOPBACK}:{self.smtp_port}")

    def _write_config(self) -> None:
        main_cf = "".join(f"{k} = {v}\n" for k, v in self.main_cf_settings().items())
        (self.config_dir / "main.cf").write_text(main_cf)
        (self.config_dir / "master.cf").write_text(self.master_cf_text())
        # Postfix re-reads a config file in 300 ms steps until its mtime is >1 s in the past
        # (dict_load_file_xt race protection): backdate the files to skip ~2 s of waiting.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _spawn(self, env: _PostfixEnv) -> None:
        spec = {
            "env": _child_env(),
            "parent": os.getpid(),
            "orphan_cleanup": str(self.root) if self._runtime_is_external else "",
            "procs": {
                "sink": {
                    "argv": [
                        SMTP_SINK_BIN,
                        "-u",
                        "postfix",
                        *self.sink_options,
                        "-d",
                        "%Y%m%d%H%M%S.",
                        f"{LOOPBACK}:{self.sink_port}",
                        "256",
                    ],
                    "cwd": str(self.sink_dir),
                    "log": str(self.root / "smtp-sink.log"),
                },
                "master": {
                    "argv": [str(env.daemon_directory / "master"), "-c", str(self.config_dir)],
                    "cwd": str(self.queue_dir),
                    "log": str(self.root / "master.log"),
                },
            },
        }
        with (self.root / "supervisor.log").open("ab") as log:
            self._supervisor = subprocess.Popen(
                [sys.executable, "-I", "-c", _SUPERVISOR, json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                env=_child_env(),
            )
        assert self._supervisor.stdout is not None
        line = self._supervisor.stdout.readline()
        if not line:
            self.fail("process supervisor exited before starting Postfix/smtp-sink")
        self._pids = {str(k): int(v) for k, v in json.loads(line).items()}

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = {"master": self.smtp_port, "sink": self.sink_port}
        while True:
            for name, port in list(pending.items()):
                pid = self._pids[name]
                if _proc_state(pid) is None:
                    self._fail_start(f"{name} (pid {pid}) exited during start-up")
                inode = _listening_inode(port)
                if inode is not None and _owns_socket(pid, inode):
                    del pending[name]
            if not pending and "daemon started" in self.maillog():
                break  # listening, and logging works (so failures can show the maillog)
            if time.monotonic() > deadline:
                what = sorted(pending) or ["'daemon started' in the maillog"]
                self.fail(f"timeout after {self.start_timeout}s waiting for {what}")
            time.sleep(0.005)

    def _fail_start(self, message: str) -> NoReturn:
        # master's fatal errors about main.cf reach neither the maillog (not set up yet) nor a
        # non-tty stderr, only syslog. "postfix check" validates the same parameters and
        # prints to stderr when that is a terminal: run it on a pty to get the reason.
        rc, output = _run_on_pty([POSTFIX_BIN, "-c", str(self.config_dir), "check"])
        self.fail(f"{message}\npostfix check (rc={rc}): {output.strip() or '(no output)'}")

    def _stop_processes(self) -> None:
        sup = self._supervisor
        if sup is None:
            return
        master = self._pids.get("master")
        try:
            if sup.stdin is not None:
                try:
                    sup.stdin.close()  # EOF: the supervisor SIGTERMs master and smtp-sink
                except OSError:
                    pass
            try:
                sup.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                # Something ignores SIGTERM: kill the master's process group and the sink.
                if master is not None:
                    try:
                        os.killpg(master, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for pid in self._pids.values():
                    if _proc_state(pid) is not None:
                        os.kill(pid, signal.SIGKILL)
                try:
                    sup.wait(5)
                except subprocess.TimeoutExpired:
                    sup.kill()
                    sup.wait()
            # Belt and braces: nothing of the master's process group may survive.
            if master is not None:
                for pid in _processes_in_group(master):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        finally:
            if sup.stdout is not None:
                sup.stdout.close()

    def _finish_runtime_dir(self) -> None:
        if not self._runtime_is_external:
            return
        keep = self.base_dir / "postfix"
        runtime = self.root
        try:
            keep.unlink()
            keep.mkdir()
            for name in ("maillog", "master.log", "smtp-sink.log", "supervisor.log"):
                if (runtime / name).exists():
                    shutil.copy2(runtime / name, keep / name)
            for name in ("conf", "sink"):
                if (runtime / name).is_dir():
                    shutil.copytree(runtime / name, keep / name)
        finally:
            shutil.rmtree(runtime, ignore_errors=True)
            self.root = keep
            self._runtime_is_external = False

    # -- diagnostics ------------------------------------------------------------------------

    def maillog(self) -> str:
        """The whole Postfix log of this instance so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maillog_tail(self, lines: int = _MAILLOG_TAIL_LINES) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def diagnostics(self) -> str:
        parts = [f"--- maillog tail ({self.maillog_path}) ---", self.maillog_tail() or "(empty)"]
        for name in ("master.log", "smtp-sink.log", "supervisor.log"):
            try:
                text = (self.root / name).read_text(errors="replace").strip()
            except FileNotFoundError:
                continue
            if text:
                parts += [f"--- {name} ---", text[-4000:]]
        return "\n".join(parts)

    def fail(self, message: str) -> NoReturn:
        """Raise AssertionError with ``message`` plus the maillog tail and process logs."""
        raise AssertionError(f"{message}\n{self.diagnostics()}")

    # -- sending ----------------------------------------------------------------------------

    def session(
        self, helo: str = "client.test", *, timeout: float = 60.0, ehlo: bool = True
    ) -> SMTPSession:
        """Open an SMTP session (use as a context manager) to send several messages."""
        if not self.running:
            self.fail("Postfix instance is not running")
        return SMTPSession(
            self.host, self.smtp_port, helo=helo, timeout=timeout, on_error=self.fail, ehlo=ehlo
        )

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        helo: str = "client.test",
        *,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> SendResult:
        """Send one message over a fresh connection; returns every reply (never raises on
        rejects)."""
        with self.session(helo, timeout=timeout) as s:
            return s.send(
                sender, recipients, message, mail_options=mail_options, rcpt_options=rcpt_options
            )

    # -- queue and sink ---------------------------------------------------------------------

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name: hold/deferred/active...)."""
        proc = subprocess.run(
            [POSTQUEUE_BIN, "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            check=False,
            env=_child_env(),
        )
        if proc.returncode != 0:
            self.fail(f"postqueue -j failed ({proc.returncode}): {proc.stderr.strip()}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def busy_queue_files(self) -> list[str]:
        """Queue ids of messages Postfix is still processing (maildrop/incoming/active).

        Cheap (directory listing, no subprocess). Listed in the order mail moves through the
        queues so that a message moving between them is never missed.
        """
        found: list[str] = []
        for name in _BUSY_QUEUES:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / name):
                found.extend(files)
        return found

    def wait_queue_idle(self, timeout: float = 30.0) -> None:
        """Wait until no message is in maildrop/incoming/active (held/deferred ones may stay)."""
        deadline = time.monotonic() + timeout
        while self.busy_queue_files():
            self._check_alive()
            if time.monotonic() > deadline:
                self.fail(f"queue not idle after {timeout}s: {self.queue()}")
            time.sleep(0.01)

    def sink_files(self) -> list[Path]:
        """Dump files written by smtp-sink, oldest first (files of aborted transactions are
        removed by smtp-sink; the newest may still be in progress)."""
        files = [p for p in self.sink_dir.iterdir() if _SINK_SUFFIX_RE.match(p.name)]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def delivered(self) -> list[SinkMessage]:
        """Parse all sink files now (call :meth:`wait_delivered` first to be sure they are
        complete)."""
        return [parse_sink_file(p.read_bytes(), p) for p in self.sink_files()]

    def wait_delivered(
        self, count: int, timeout: float = 30.0, *, settle: float = 1.0
    ) -> list[SinkMessage]:
        """Wait until exactly ``count`` messages reached the sink and Postfix is idle.

        Returns all sink messages in arrival order (delivery order is not guaranteed to match
        submission order: match messages by header). smtp-sink closes a dump file before it
        acknowledges the final dot, so once Postfix has no message in incoming/active, every
        file is complete. Fails (AssertionError with the maillog tail) on timeout, if more
        than ``count`` messages arrived, or early if Postfix has been idle for ``settle``
        seconds without reaching ``count`` (mail that is deferred or on hold will not arrive).
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        idle_since: float | None = None
        while True:
            self._check_alive()
            busy = self.busy_queue_files()
            n = len(self.sink_files())
            now = time.monotonic()
            if not busy:
                # Re-check the sink after seeing an idle queue: deliveries finished meanwhile
                # are then counted, so "idle and n >= count" really means complete.
                n = len(self.sink_files())
                if n >= count:
                    break
                idle_since = idle_since if idle_since is not None else now
                if now - idle_since >= settle:
                    self.fail(
                        f"expected {count} delivered message(s), sink has {n} and Postfix is "
                        f"idle; queue: {self.queue()}"
                    )
            else:
                idle_since = None
            if now > deadline:
                self.fail(
                    f"timeout after {timeout}s: expected {count} delivered message(s), sink has "
                    f"{n}; queue: {self.queue()}"
                )
            time.sleep(0.01)
        messages = self.delivered()
        if len(messages) != count:
            summary = [(m.sender, m.recipients, m.header("Subject")) for m in messages]
            self.fail(f"expected {count} delivered message(s), got {len(messages)}: {summary}")
        self.timings["last_wait_delivered"] = time.monotonic() - t0
        return messages

    def clear_sink(self) -> None:
        """Remove all delivered messages (call only when Postfix is idle)."""
        for p in self.sink_files():
            p.unlink()

    # -- Postfix commands -------------------------------------------------------------------

    def postfix_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c <config_dir> ARGS`` (e.g. ``"check"``, ``"flush"``)."""
        return subprocess.run(
            [POSTFIX_BIN, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=False,
            env=_child_env(),
        )

    def check(self) -> str:
        """Run ``postfix check``; return its warnings (stderr and the ``postfix-script`` /
        ``postfix`` lines it logs), fail on a non-zero exit."""
        before = len(self.maillog())
        proc = self.postfix_command("check")
        self._wait_maillog_quiet()
        logged = [
            line
            for line in self.maillog()[before:].splitlines()
            if "/postfix-script[" in line or "/postfix[" in line
        ]
        output = "\n".join([*(proc.stdout + proc.stderr).strip().splitlines(), *logged])
        if proc.returncode != 0:
            self.fail(f"postfix check failed ({proc.returncode}): {output}")
        return output

    def _wait_maillog_quiet(self, quiet: float = 0.1, timeout: float = 2.0) -> None:
        """Wait until the maillog has not grown for ``quiet`` seconds (postlogd is async)."""
        deadline = time.monotonic() + timeout
        size = -1
        while time.monotonic() < deadline:
            new_size = self.maillog_path.stat().st_size if self.maillog_path.exists() else 0
            if new_size == size:
                return
            size = new_size
            time.sleep(quiet)

    def _check_alive(self) -> None:
        if not self.running:
            dead = [n for n, pid in self._pids.items() if _proc_state(pid) is None]
            self.fail(f"Postfix instance died (gone: {dead or ['supervisor']})")
