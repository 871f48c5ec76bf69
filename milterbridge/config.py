"""The configuration file: TOML decoded by msgspec into frozen Structs.

Keys are camelCase to match the reference objects; unknown keys are errors (a typo must not
silently fall back to a default); every error names the file and the key path. An empty file --
or no file at all -- is the embedded default: listen on inet:127.0.0.1:8899, no filters.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

import msgspec
import structlog

from .durations import Duration, Size, dec_hook
from .expr import CompiledRules, RuleError, compile_rules
from .listeners import ListenerSpecError, parse_listener
from .milter.constants import ALL_ACTIONS, ALL_PROTOCOL, Protocol

log = structlog.get_logger("milterbridge.config")

DEFAULT_LISTEN = "inet:127.0.0.1:8899"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8900"

#: A filter stage, as written in ``stages``.
Stage = Literal["connect", "ehlo", "auth", "mail", "rcpt", "data"]
#: Every stage, in the order an SMTP session reaches them.
SMTP_STAGE_ORDER: Final[tuple[Stage, ...]] = ("connect", "ehlo", "auth", "mail", "rcpt", "data")
#: Whether a filter's answers reach the MTA ("enforce") or are only logged ("observe").
Mode = Literal["enforce", "observe"]
#: The milter protocol version spoken to an upstream filter.
MilterVersion = Literal["v6", "v2"]
#: A filter name: it becomes a metric label and a log field, so it is short and plain.
FilterName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]

#: SMFIF_* bits a filter may be offered (SMFI_CURR_ACTS).
ACTION_FLAGS_MASK: Final = int(ALL_ACTIONS)
#: SMFIP_* bits an MTA may offer: SMFI_CURR_PROT plus the macro-size (MDS) bits.
PROTOCOL_FLAGS_MASK: Final = int(ALL_PROTOCOL | Protocol.MDS_256K | Protocol.MDS_1M)

# Longest path a Unix socket address holds on Linux (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107
#: A body chunk (65,535 bytes) plus its command byte must always fit.
_MIN_MTA_PACKET = 65536
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and key path."""


class _KeyProblem(ValueError):
    """A check in ``__post_init__`` that names the key, relative to the struct it runs in.

    msgspec turns it into a ValidationError at the struct's path and keeps it as the cause;
    ``_describe`` joins the two paths.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    """Shared policy: immutable, keyword-only, typo-proof, camelCase keys."""


class ServerConfig(Base, frozen=True):
    """``[server]``: the milter listeners the MTA connects to."""

    listen: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_LISTEN]
    )
    #: Permissions of unix: sockets, octal as in chmod.
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")] = "0660"
    #: MTA sessions served at once; a connection beyond them is answered TEMPFAIL at CONNECT.
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: How long SIGTERM waits for running sessions before answering them TEMPFAIL.
    drain_deadline: Duration = Duration(30.0)
    #: Bytes of a message body kept in memory per session (for hooks) before spilling to disk.
    spool_memory: Size = Size(1024 * 1024)
    #: Where spilled bodies go (anonymous, already unlinked files); None: the system's TMPDIR.
    spool_directory: str | None = None
    #: Largest packet accepted from the MTA (command byte plus payload).
    max_mta_packet: Size = Size(1024 * 1024 + 1)
    #: How long an MTA connection may stay silent before the bridge closes it.
    idle_timeout: Duration = Duration(600.0)
    #: Headers per message; the one beyond is refused (552 5.3.4).
    max_headers: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Recipients per message; each one beyond is refused (452 4.5.3).
    max_recipients: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Let the MTA stream headers and body without waiting; refusals come at end-of-message.
    defer_message_verdicts: bool = False
    #: Consecutive failures after which a filter's circuit opens.
    circuit_failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    #: How long an open circuit stays open before one attempt may go through.
    circuit_backoff: Duration = Duration(10.0)
    #: The longest back-off (it doubles after each failed attempt).
    circuit_backoff_max: Duration = Duration(300.0)

    def __post_init__(self) -> None:
        if self.max_mta_packet < _MIN_MTA_PACKET:
            raise _KeyProblem(
                "maxMtaPacket",
                f"{int(self.max_mta_packet)} is too small: the MTA sends body chunks of up to "
                f"{_MIN_MTA_PACKET - 1} bytes",
            )
        for spec in self.listen:
            try:
                parse_listener(spec)
            except ListenerSpecError as exc:
                raise ValueError(f"listen: {exc}") from None


class AdminConfig(Base, frozen=True):
    """``[admin]``: the HTTP listener for /metrics, /healthz, /readyz and /api."""

    #: ``HOST:PORT`` (``[::1]:PORT`` for IPv6); an empty string turns the listener off.
    listen: str = DEFAULT_ADMIN_LISTEN
    #: The JSON file holding the filters created through /api; None: the API cannot change
    #: anything (a token may then only read).
    state_file: str | None = None
    #: ``[[admin.token]]``: who may call /api, and what each may do; none: /api is off (404).
    token: list[AdminToken] = []

    def __post_init__(self) -> None:
        if self.listen:
            try:
                parse_host_port(self.listen)
            except ValueError as exc:
                raise _KeyProblem("listen", str(exc)) from None
        if self.state_file is not None and not self.state_file:
            raise _KeyProblem("stateFile", "empty path (leave the key out to have no state file)")
        names: dict[str, int] = {}
        secrets: dict[str, int] = {}
        for index, token in enumerate(self.token):
            if token.name in names:
                raise _KeyProblem(
                    f"token[{index}].name",
                    f"duplicate token name {token.name!r} (also token[{names[token.name]}])",
                )
            names[token.name] = index
            # Two tokens with one secret would make the permissions of a call depend on which
            # entry the lookup met first.
            secret = token.secret.reveal()
            if secret in secrets:
                raise _KeyProblem(
                    f"token[{index}].secret", f"the same secret as token[{secrets[secret]}]"
                )
            secrets[secret] = index
            if self.state_file is None:
                writes = [p for p in token.permissions if p in _WRITE_PERMISSIONS]
                if writes:
                    raise _KeyProblem(
                        f"token[{index}].permissions",
                        f"{writes[0]} needs admin.stateFile (where created filters are kept)",
                    )


#: What a ``[[admin.token]]`` may do: one permission per method and ``/set`` operation.
Permission = Literal[
    "sysMtaMilterGet",
    "sysMtaMilterCreate",
    "sysMtaMilterUpdate",
    "sysMtaMilterDestroy",
    "sysMtaMilterQuery",
    "sysMtaHookGet",
    "sysMtaHookCreate",
    "sysMtaHookUpdate",
    "sysMtaHookDestroy",
    "sysMtaHookQuery",
]
_WRITE_PERMISSIONS: Final = frozenset(
    f"sysMta{kind}{operation}"
    for kind in ("Milter", "Hook")
    for operation in ("Create", "Update", "Destroy")
)


class AdminToken(Base, frozen=True):
    """``[[admin.token]]``: one bearer token of the admin API and its permissions."""

    #: Names the token in log lines (never the secret itself).
    name: FilterName
    #: The token, as the client sends it after ``Authorization: Bearer``.
    secret: Secret
    permissions: list[Permission] = []

    def __post_init__(self) -> None:
        _check_secret("secret", self.secret)
        if not self.secret.reveal():
            # An empty token would be matched by a bare "Authorization: Bearer" header.
            raise _KeyProblem("secret", "the token is empty")


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:8900``, ``[::1]:8900`` or ``localhost:8900`` as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT (e.g. '127.0.0.1:8900')")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not _is_host(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host, int(port)


class ExpressionMatch(Base, frozen=True):
    """One ``{if = ..., then = ...}`` rule of an :class:`Expression`."""

    if_: str = msgspec.field(name="if")
    then: str


class Expression(Base, frozen=True):
    """``{match = [{if = ..., then = ...}, ...], else = ...}``: the first rule whose ``if`` holds
    gives the value, else ``else`` does. Every part is an expression of the ``enable`` language
    (milterbridge/expr), compiled once when the file is loaded; an error points at the part.
    """

    else_: str = msgspec.field(name="else")
    match: list[ExpressionMatch] = []

    def __post_init__(self) -> None:
        try:
            self.compiled()
        except RuleError as exc:
            raise _KeyProblem(exc.location, f"{exc.message}\n{exc.caret()}") from None

    def compiled(self) -> CompiledRules:
        """The compiled rules (compiled once per distinct expression, then cached).

        Looked up by the object's identity first: ``evaluate`` runs for every filter at every
        stage, and building the text key for the shared cache cost more than the evaluation.
        """
        known = _COMPILED_BY_ID.get(id(self))
        if known is not None and known[0] is self:
            return known[1]
        rules = _compile_rules(tuple((m.if_, m.then) for m in self.match), self.else_)
        if len(_COMPILED_BY_ID) >= _COMPILED_BY_ID_MAX:
            _COMPILED_BY_ID.clear()
        # The entry holds the expression itself, so its id cannot be reused while cached.
        _COMPILED_BY_ID[id(self)] = (self, rules)
        return rules

    def evaluate(self, variables: Mapping[str, str | list[str]]) -> bool:
        """Whether the filter is enabled with these session variables (unknown ones empty)."""
        return self.compiled().evaluate(variables)


_COMPILED_BY_ID: dict[int, tuple[Expression, CompiledRules]] = {}
_COMPILED_BY_ID_MAX = 4096


@functools.lru_cache(maxsize=1024)
def _compile_rules(match: tuple[tuple[str, str], ...], else_: str) -> CompiledRules:
    return compile_rules(match, else_)


def _always() -> Expression:
    return Expression(else_="true")


def _default_stages() -> list[Stage]:
    return ["data"]


class MilterFilter(Base, frozen=True):
    """``[[milter]]``: one upstream milter (the MtaMilter reference object, plus our keys)."""

    name: FilterName
    #: Host name or IP address; exactly one of hostname and unix_path is set.
    hostname: str | None = None
    #: Absolute path of the filter's Unix socket.
    unix_path: str | None = None
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 11332
    use_tls: bool = False
    allow_invalid_certs: bool = False
    #: Largest packet accepted from the filter.
    max_response_size: Size = Size(52428800)
    temp_fail_on_error: bool = True
    protocol_version: MilterVersion = "v6"
    #: As written (no duplicates); see stages_in_smtp_order().
    stages: Annotated[list[Stage], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=_default_stages
    )
    timeout_command: Duration = Duration(30.0)
    timeout_connect: Duration = Duration(30.0)
    timeout_data: Duration = Duration(60.0)
    #: SMFIF_* bits to offer instead of the default; None: the default.
    flags_action: int | None = None
    #: SMFIP_* bits to offer instead of the default; None: the default.
    flags_protocol: int | None = None
    enable: Expression = msgspec.field(default_factory=_always)
    #: "enforce": its answers count; "observe": logged and counted, never reach the MTA.
    mode: Mode = "enforce"
    #: The pass it runs in at end-of-message: pass n+1 sees the message as passes <= n left it.
    pass_: Annotated[int, msgspec.Meta(ge=1)] = msgspec.field(name="pass", default=1)

    def __post_init__(self) -> None:
        self._check_address()
        _check_unique_stages(self.stages)
        _check_flags("flagsAction", self.flags_action, ACTION_FLAGS_MASK, "SMFIF_* action")
        _check_flags("flagsProtocol", self.flags_protocol, PROTOCOL_FLAGS_MASK, "SMFIP_* protocol")

    def _check_address(self) -> None:
        if self.hostname is not None and self.unix_path is not None:
            raise _KeyProblem("", "give hostname or unixPath, not both")
        if self.unix_path is not None:
            if not self.unix_path.startswith("/"):
                raise _KeyProblem("unixPath", f"{self.unix_path!r}: the path must be absolute")
            if "\0" in self.unix_path:
                raise _KeyProblem("unixPath", f"{self.unix_path!r}: contains a NUL character")
            if len(self.unix_path.encode()) > _SUN_PATH_MAX:
                raise _KeyProblem(
                    "unixPath", f"{self.unix_path!r}: longer than a Unix socket address allows"
                )
            if self.use_tls:
                raise _KeyProblem("useTls", "TLS is not available over a Unix socket (unixPath)")
            return
        if self.hostname is None:
            raise _KeyProblem("", "missing hostname (or unixPath for a Unix socket)")
        if not _is_host(self.hostname):
            raise _KeyProblem("hostname", f"{self.hostname!r} is not a host name or IP address")

    def stages_in_smtp_order(self) -> tuple[Stage, ...]:
        """The configured stages sorted in the order an SMTP session reaches them."""
        return tuple(stage for stage in SMTP_STAGE_ORDER if stage in self.stages)


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return _HOST_NAME.fullmatch(text) is not None
    return True


def _check_flags(key: str, value: int | None, mask: int, what: str) -> None:
    if value is None:
        return
    if value < 0:
        raise _KeyProblem(key, f"{value}: {what} flags cannot be negative")
    if value & ~mask:
        raise _KeyProblem(
            key, f"{value} ({value:#x}) has bits outside the {what} flags (mask {mask:#x})"
        )


class SecretValue(Base, frozen=True, tag_field="@type", tag="Value"):
    """A secret written in the file itself."""

    secret: str

    def reveal(self) -> str:
        return self.secret

    def __repr__(self) -> str:
        return "SecretValue(secret=<hidden>)"


class SecretEnvironmentVariable(Base, frozen=True, tag_field="@type", tag="EnvironmentVariable"):
    """A secret read from the environment when the config is loaded."""

    variable_name: Annotated[str, msgspec.Meta(min_length=1)]

    def reveal(self) -> str:
        value = os.environ.get(self.variable_name)
        if value is None:
            raise _KeyProblem(
                "variableName", f"environment variable {self.variable_name} is not set"
            )
        return value


class SecretFile(Base, frozen=True, tag_field="@type", tag="File"):
    """A secret read from a file when the config is loaded (one trailing newline dropped)."""

    file_path: Annotated[str, msgspec.Meta(min_length=1)]

    def reveal(self) -> str:
        try:
            text = Path(self.file_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _KeyProblem("filePath", f"cannot read {self.file_path}: {reason}") from None
        return text.removesuffix("\n").removesuffix("\r")


#: Where a secret comes from; ``reveal()`` gives its value (checked when the config loads).
Secret = SecretValue | SecretEnvironmentVariable | SecretFile


class HttpAuthUnauthenticated(Base, frozen=True, tag_field="@type", tag="Unauthenticated"):
    """No Authorization header."""


class HttpAuthBasic(Base, frozen=True, tag_field="@type", tag="Basic"):
    """HTTP Basic authentication."""

    username: str
    secret: Secret

    def __post_init__(self) -> None:
        _check_secret("secret", self.secret)


class HttpAuthBearer(Base, frozen=True, tag_field="@type", tag="Bearer"):
    """``Authorization: Bearer <token>``."""

    bearer_token: Secret

    def __post_init__(self) -> None:
        _check_secret("bearerToken", self.bearer_token)
        if not _HEADER_VALUE.fullmatch(self.bearer_token.reveal()):
            # Caught here, not by h11 at the first call: its error text quotes the header,
            # secret included, and would reach the log.
            raise _KeyProblem(
                "bearerToken",
                "holds a control character or white space at an end, "
                "which an HTTP header cannot carry",
            )


HttpAuth = HttpAuthUnauthenticated | HttpAuthBasic | HttpAuthBearer


#: A token an HTTP header field can carry (RFC 9110 §5.5: no controls, no outer white space).
_HEADER_VALUE = re.compile(r"[\x21-\x7e\x80-\U0010ffff]+(?:[ \t]+[\x21-\x7e\x80-\U0010ffff]+)*")


def _check_secret(key: str, secret: Secret) -> None:
    try:
        secret.reveal()
    except _KeyProblem as exc:
        raise _KeyProblem(f"{key}.{exc.key}", exc.problem) from None


class HookFilter(Base, frozen=True):
    """``[[hook]]``: one HTTP MTA hook (the MtaHook reference object, plus our keys)."""

    name: FilterName
    url: str
    stages: Annotated[list[Stage], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=_default_stages
    )
    enable: Expression = msgspec.field(default_factory=_always)
    allow_invalid_certs: bool = False
    #: Extra request headers, sent with every call.
    http_headers: dict[str, str] = {}
    timeout: Duration = Duration(30.0)
    temp_fail_on_error: bool = True
    #: Largest response body read; beyond it the call is a filter error.
    max_response_size: Size = Size(52428800)
    http_auth: HttpAuth = msgspec.field(default_factory=HttpAuthUnauthenticated)
    #: "enforce": its answers count; "observe": logged and counted, never reach the MTA.
    mode: Mode = "enforce"
    #: The pass it runs in at end-of-message: pass n+1 sees the message as passes <= n left it.
    pass_: Annotated[int, msgspec.Meta(ge=1)] = msgspec.field(name="pass", default=1)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _KeyProblem("url", f"{self.url!r}: expected an http:// or https:// URL")
        _check_unique_stages(self.stages)
        for header in self.http_headers:
            if not _HEADER_NAME.fullmatch(header):
                raise _KeyProblem(f"httpHeaders.{header}", "not a valid HTTP header name")
        for header, value in self.http_headers.items():
            if "\r" in value or "\n" in value:
                raise _KeyProblem(
                    f"httpHeaders.{header}", "a header value cannot hold a line break"
                )

    def stages_in_smtp_order(self) -> tuple[Stage, ...]:
        """The configured stages sorted in the order an SMTP session reaches them."""
        return tuple(stage for stage in SMTP_STAGE_ORDER if stage in self.stages)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_unique_stages(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for index, stage in enumerate(stages):
        if stage in seen:
            raise _KeyProblem(f"stages[{index}]", f"stage {stage!r} is listed twice")
        seen.add(stage)


#: Any configured filter.
Filter = MilterFilter | HookFilter


class Config(Base, frozen=True):
    """The whole file."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    #: ``[[milter]]`` tables, in file order (the merge order, milters before hooks).
    milter: list[MilterFilter] = []
    #: ``[[hook]]`` tables, in file order.
    hook: list[HookFilter] = []

    def __post_init__(self) -> None:
        first: dict[str, str] = {}
        tables: tuple[tuple[str, Sequence[Filter]], ...] = (
            ("milter", self.milter),
            ("hook", self.hook),
        )
        for table, filters in tables:
            for index, item in enumerate(filters):
                key = f"{table}[{index}]"
                if item.name in first:
                    raise _KeyProblem(
                        f"{key}.name",
                        f"duplicate filter name {item.name!r} (also {first[item.name]})",
                    )
                first[item.name] = key

    @property
    def filters(self) -> list[Filter]:
        """Every filter in merge order: the milters, then the hooks."""
        return [*self.milter, *self.hook]

    def summary(self) -> str:
        """One line for ``check-config``: the listeners and the filters."""
        parts = [f"listen: {', '.join(self.server.listen)}"]
        for kind, names in (
            ("milter", [m.name for m in self.milter]),
            ("hook", [h.name for h in self.hook]),
        ):
            if names or kind == "milter":
                text = f"{len(names)} {kind}{'' if len(names) == 1 else 's'}"
                parts.append(text + (": " + ", ".join(names) if names else ""))
        return "; ".join(parts)


EMBEDDED_DEFAULT = Config()

_PATH = re.compile(r" - at `\$\.?(.*)`$")


def _join(path: str, key: str) -> str:
    if not path or not key:
        return path or key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _describe(path: Path, exc: msgspec.MsgspecError) -> str:
    message = str(exc)
    match = _PATH.search(message)
    cause = exc.__cause__
    if isinstance(cause, _KeyProblem):
        key = _join(match.group(1) if match else "", cause.key) or "(top level)"
        return f"{path}: {key}: {cause.problem}"
    if match is None:
        where = "(top level): " if isinstance(exc, msgspec.ValidationError) else ""
        return f"{path}: {where}{message}"
    key = match.group(1) or "(top level)"
    return f"{path}: {key}: {message[: match.start()]}"


def parse_config(data: bytes | str, path: Path) -> Config:
    """Decode a config document; ``path`` only names it in errors."""
    try:
        return msgspec.toml.decode(data, type=Config, dec_hook=dec_hook)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(_describe(path, exc)) from None


def load_config(path: Path) -> Config:
    """Read and validate a config file. Raises ConfigError for every problem, I/O included.

    Logs one ``insecure_tls`` warning per filter whose TLS certificate is not verified, so that
    every start, reload and ``check-config`` says so.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    config = parse_config(data, path)
    for kind, name in insecure_tls(config):
        log.warning(
            "insecure_tls",
            filter=name,
            kind=kind,
            config=str(path),
            reason="allowInvalidCerts: any certificate is accepted, so the connection can be "
            "intercepted",
        )
    return config


def insecure_tls(config: Config) -> list[tuple[Literal["milter", "hook"], str]]:
    """(kind, name) of each filter that speaks TLS without verifying the certificate: a milter
    with ``useTls`` and ``allowInvalidCerts``, a hook with an https URL and
    ``allowInvalidCerts`` (without TLS the key has no effect)."""
    found: list[tuple[Literal["milter", "hook"], str]] = [
        ("milter", milter.name)
        for milter in config.milter
        if milter.use_tls and milter.allow_invalid_certs
    ]
    found += [
        ("hook", hook.name)
        for hook in config.hook
        if hook.allow_invalid_certs and urlsplit(hook.url).scheme == "https"
    ]
    return found
