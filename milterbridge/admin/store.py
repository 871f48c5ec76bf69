"""The filters the service runs: the config file's (read-only) and those created through /api.

Two sources, one list. The ``[[milter]]`` and ``[[hook]]`` tables of the TOML file stay the
operator's: the API shows them but cannot change them (a change there would be lost, or would
fight the file, at the next reload). Filters created through the API live in the *state file*
(``[admin] stateFile``), a JSON document this module alone writes. The service runs both, in
merge order: the file's milters, then the API's milters in creation order; the same for hooks.

**Validation.** An object from the API is decoded through the very msgspec types the TOML file
is decoded through (:class:`~milterbridge.config.MilterFilter`, ``HookFilter``, with the same
``dec_hook``), so every check -- types, ranges, ``enable`` expressions, secrets that must be
readable -- holds for both, and an invalid object never reaches the state file. Names are
unique across all filters of both kinds and both sources, as in the file.

**Ids.** A config filter's id is derived from its name (``config-`` and the name, with ``_``
written ``__`` and ``.`` written ``_2E`` so that it stays within JMAP's id alphabet and two names
never share an id); it is stable across restarts and reloads as long as the name is. An API
filter gets ``api-`` and 8 random hex digits when created; the id is stored with it and never
reused for another filter, so a client holding an old id cannot hit a newer object.

**The state file** is ``{"version": 1, "milters": [{"id": ..., "filter": {...}}], "hooks":
[...]}``, each ``filter`` exactly as a ``[[milter]]``/``[[hook]]`` table would be written. It is
replaced atomically: written to a temporary file in the same directory, fsynced, renamed over
the old one, and the directory fsynced, so that a crash leaves either the old or the new
document. A write that fails -- the disk is full, or read-only -- removes its temporary file and
changes nothing: the old file and the filters in memory stay, and the caller gets a
:class:`StoreWriteError` (the API answers ``serverFail``). The file holds secrets written as
``Value``, so it is created with mode 0600. The write is synchronous -- it blocks the event
loop for a write of a few KiB and two fsyncs -- which is acceptable for a rare administrative
change and keeps the write out of threads. A missing
file is an empty one; a corrupt or invalid one stops the start with an error naming the file,
like a broken config file, because silently dropping filters would silently change mail flow.

**Changes** are made on a :class:`Draft` of one kind and committed as a whole (one write, one
notification per ``/set`` call): the callbacks in :attr:`FilterStore.on_change` run after the
file is written, and the service switches *new* sessions to :meth:`FilterStore.filters`.

**Other writers.** Each worker process of ``--workers`` has its own store over the same file.
A commit first checks that the file is still the one this store last read or wrote (inode,
mtime, size); if another worker -- or an editor -- replaced it since, the commit is refused
rather than silently undoing that change, and :meth:`FilterStore.reload` (SIGHUP) reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import structlog
import trio

from ..config import (
    Config,
    ConfigError,
    Filter,
    HookFilter,
    MilterFilter,
    _describe,
    _KeyProblem,
)
from ..durations import dec_hook, enc_hook

log = structlog.get_logger("milterbridge.admin")

#: The two kinds of filter, as the store names them.
Kind = Literal["milter", "hook"]
KINDS: Final[tuple[Kind, ...]] = ("milter", "hook")
#: The struct each kind is validated with.
FILTER_TYPES: Final[Mapping[Kind, type[MilterFilter] | type[HookFilter]]] = {
    "milter": MilterFilter,
    "hook": HookFilter,
}
#: The version of the state file this code writes and reads.
STATE_VERSION: Final = 1
CONFIG_ID_PREFIX: Final = "config-"
API_ID_PREFIX: Final = "api-"
#: RFC 8620 §1.2: 1 to 255 characters of the URL-safe base64 alphabet.
_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
#: Properties to blame when a check about the whole object fails (the key it names is empty).
_WHOLE_OBJECT: Final[Mapping[Kind, tuple[str, ...]]] = {
    "milter": ("hostname", "unixPath"),
    "hook": (),
}
#: Each kind with its list's key in the state file.
_STATE_KEYS: Final[tuple[tuple[Kind, str], ...]] = (("milter", "milters"), ("hook", "hooks"))
_AT = re.compile(r" - at `\$\.?(.*)`$", re.DOTALL)
_FIELD = re.compile(r"^Object (?:contains unknown|missing required) field `(.*)`$")


class SetFailure(Exception):
    """One create, update or destroy that cannot be done: a JMAP SetError's type, description
    and, for ``invalidProperties``, the offending properties (JSON-pointer paths without the
    leading slash, ``port`` or ``httpAuth/bearerToken/variableName``)."""

    def __init__(self, type_: str, description: str, properties: Sequence[str] = ()) -> None:
        super().__init__(description)
        self.type = type_
        self.description = description
        self.properties = list(properties)


class StoreWriteError(Exception):
    """The state file could not be written; nothing changed."""


@dataclass(frozen=True, slots=True)
class Record:
    """A filter with its id; ``read_only`` for the config file's."""

    id: str
    filter: Filter
    read_only: bool


def config_id(name: str) -> str:
    """The id of the config file's filter ``name`` (see the module docstring)."""
    return CONFIG_ID_PREFIX + name.replace("_", "__").replace(".", "_2E")


def to_document(item: Filter) -> dict[str, Any]:
    """A filter as the JSON object of its config table (camelCase keys, ``"30s"``, secrets
    included: the caller decides what leaves the process)."""
    document: dict[str, Any] = msgspec.to_builtins(item, enc_hook=enc_hook)
    return document


def property_names(kind: Kind) -> tuple[str, ...]:
    """The properties of a filter of ``kind``, as written in JSON."""
    return tuple(field.encode_name for field in msgspec.structs.fields(FILTER_TYPES[kind]))


def validate(kind: Kind, document: Mapping[str, Any]) -> Filter:
    """Decode ``document`` exactly as a config table of ``kind`` is decoded.

    Raises:
        SetFailure: ``invalidProperties`` naming what is wrong.
    """
    try:
        item: Filter = msgspec.convert(document, FILTER_TYPES[kind], dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        properties, description = _problem(kind, exc)
        raise SetFailure("invalidProperties", description, properties) from None
    return item


def _problem(kind: Kind, exc: msgspec.ValidationError) -> tuple[list[str], str]:
    """The offending property paths and a one-line description of a failed decode."""
    message = str(exc)
    at = _AT.search(message)
    path = at.group(1) if at else ""
    problem = message[: at.start()] if at else message
    cause = exc.__cause__
    if isinstance(cause, _KeyProblem):
        path, problem = _join(path, cause.key), cause.problem
    else:
        field = _FIELD.match(problem)
        if field is not None:
            path = _join(path, field.group(1))
    pointer = _pointer(path)
    if pointer:
        return [pointer], f"{pointer}: {problem}"
    return list(_WHOLE_OBJECT[kind]), problem


def _join(path: str, key: str) -> str:
    if not path or not key:
        return path or key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _pointer(path: str) -> str:
    """``httpAuth.bearerToken`` -> ``httpAuth/bearerToken``; ``stages[1]`` -> ``stages/1``; a
    dict entry msgspec writes ``httpHeaders[...]`` -> ``httpHeaders``."""
    path = path.replace("[...]", "")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return "/".join(part for part in path.split(".") if part)


class _MilterEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    filter: MilterFilter


class _HookEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    filter: HookFilter


class _StateVersion(msgspec.Struct):
    version: int


class _StateFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int
    milters: list[_MilterEntry] = []
    hooks: list[_HookEntry] = []


class FilterStore:
    """The config file's filters (read-only) and the state file's, with ids; see the module
    docstring. Build it with :meth:`open`."""

    def __init__(
        self,
        config: Config,
        state_file: Path | None,
        api: Mapping[Kind, Sequence[Record]] | None = None,
    ) -> None:
        self.state_file = state_file
        #: Called, in order, after each committed change (the state file already written).
        self.on_change: list[Callable[[], None]] = []
        #: Called, in order, with each :class:`StoreWriteError` before it is raised (the
        #: service counts them: the API answers the call, but the disk needs an operator).
        self.on_write_error: list[Callable[[StoreWriteError], None]] = []
        #: Held by whoever reads, decides and commits a change, so that two /api calls never
        #: decide on the same old state.
        self.lock = trio.Lock()
        self._config = _config_records(config)
        self._api: dict[Kind, list[Record]] = {
            kind: list((api or {}).get(kind, ())) for kind in KINDS
        }
        self._states: dict[Kind, str] = {}
        #: What the state file was when last read or written here (None: it did not exist).
        self._stamp: _Stamp | None = None

    @classmethod
    def open(cls, config: Config, *, state_file: Path | None = None) -> FilterStore:
        """The store for ``config``, with the filters of its state file loaded.

        ``state_file`` defaults to ``[admin] stateFile``; without one the store keeps API
        filters in memory only (nothing can create them then: the config refuses write
        permissions without a state file).

        Raises:
            ConfigError: the state file cannot be read, is not a valid state file, or holds a
                filter whose name the config file also uses; the message names the file.
        """
        if state_file is None and config.admin.state_file is not None:
            state_file = Path(config.admin.state_file)
        store = cls(config, state_file)
        if state_file is not None:
            store._stamp = _stamp(state_file)
            store._api = _load(state_file, store._config)
        return store

    # --- reading ------------------------------------------------------------------------------

    def filters(self) -> tuple[list[MilterFilter], list[HookFilter]]:
        """The filters to run, in merge order: config milters, then API milters in creation
        order; config hooks, then API hooks."""
        milters = [r.filter for r in self.records("milter") if isinstance(r.filter, MilterFilter)]
        hooks = [r.filter for r in self.records("hook") if isinstance(r.filter, HookFilter)]
        return milters, hooks

    def merged(self, config: Config) -> Config:
        """``config`` with its ``milter`` and ``hook`` lists replaced by :meth:`filters`."""
        milters, hooks = self.filters()
        return msgspec.structs.replace(config, milter=milters, hook=hooks)

    def records(self, kind: Kind) -> list[Record]:
        """Every filter of ``kind`` with its id, in merge order."""
        return [*self._config[kind], *self._api[kind]]

    def find(self, kind: Kind, id_: str) -> Record | None:
        """The filter of ``kind`` with this id, if any."""
        for record in self.records(kind):
            if record.id == id_:
                return record
        return None

    def state(self, kind: Kind) -> str:
        """JMAP's state string for ``kind``: a digest of its filters and ids, so it changes
        with every change and stays the same across restarts while nothing changes."""
        state = self._states.get(kind)
        if state is None:
            encoded = msgspec.json.encode(
                [(r.id, r.read_only, r.filter) for r in self.records(kind)], enc_hook=enc_hook
            )
            state = hashlib.sha256(encoded).hexdigest()[:16]
            self._states[kind] = state
        return state

    # --- changing -----------------------------------------------------------------------------

    def draft(self, kind: Kind) -> Draft:
        """A copy of ``kind``'s API filters to change and then :meth:`commit`."""
        return Draft(self, kind)

    def commit(self, draft: Draft) -> None:
        """Write the state file with ``draft``'s filters, then switch to them and notify.

        Raises:
            StoreWriteError: the file could not be written, or it was changed by someone else
                since this store last read or wrote it (another worker process, an editor):
                writing would silently undo that change. The store is unchanged.
            ValueError: the draft is stale (the store changed since it was made).

        A draft that changes nothing writes nothing and notifies no one.
        """
        if draft.store is not self or draft.base != self._api[draft.kind]:
            raise ValueError("stale draft: the store changed since it was made")
        if not draft.changed:
            return
        api = dict(self._api)
        api[draft.kind] = list(draft.records)
        if self.state_file is not None:
            try:
                self._write(self.state_file, api)
            except StoreWriteError as exc:
                for report in list(self.on_write_error):
                    report(exc)
                raise
        self._api = api
        self._states.clear()
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:
                # The change is made and written; one broken listener must not hide it from
                # the others, nor turn the answer into an error.
                log.exception("admin_change_callback_failed")

    def _write(self, path: Path, api: Mapping[Kind, Iterable[Record]]) -> None:
        """Replace the state file by ``api``'s filters; on any failure the old file stays whole
        and no temporary file is left in its directory.

        Raises:
            StoreWriteError: see :meth:`commit`.
        """
        try:
            if _stamp(path) != self._stamp:
                raise StoreWriteError(
                    f"{path} was changed by another process since it was loaded; reload "
                    "the service (SIGHUP) to read it, then retry"
                )
            _write_atomically(path, _encode_state(api))
            self._stamp = _stamp(path)
        except OSError as exc:
            raise StoreWriteError(f"cannot write {path}: {exc.strerror or exc}") from None

    def reload(self, config: Config) -> None:
        """Take the config file's new filters and re-read the state file (SIGHUP), so that a
        reload also picks up what another worker process wrote. Call :meth:`merged` afterwards
        for the configuration to apply; no callback runs.

        Raises:
            ConfigError: the state file is broken, or a new config filter takes the name of an
                API filter; nothing changed.
        """
        records = _config_records(config)
        api, stamp = self._api, self._stamp
        if self.state_file is not None:
            stamp = _stamp(self.state_file)
            api = _load(self.state_file, records)
        else:
            _check_names(records, api, None)
        self._config, self._api, self._stamp = records, api, stamp
        self._states.clear()


class Draft:
    """A working copy of one kind's API filters; every method checks as it goes, so that the
    later operations of one ``/set`` see the earlier ones (a name freed by an update can be
    taken by the next create)."""

    def __init__(self, store: FilterStore, kind: Kind) -> None:
        self.store = store
        self.kind = kind
        self.base = list(store._api[kind])
        self.records = list(self.base)

    def _index(self, id_: str) -> int:
        for index, record in enumerate(self.records):
            if record.id == id_:
                return index
        if any(record.id == id_ for record in self.store._config[self.kind]):
            raise SetFailure(
                "forbidden",
                f"{id_} comes from the config file, which the API cannot change; edit the "
                "file and reload instead",
            )
        raise SetFailure("notFound", f"no {self.kind} with id {id_}")

    def document(self, id_: str) -> dict[str, Any]:
        """The current JSON object of the API filter ``id_`` (secrets included).

        Raises:
            SetFailure: ``notFound``, or ``forbidden`` for a config filter.
        """
        return to_document(self.records[self._index(id_)].filter)

    def create(self, document: Mapping[str, Any]) -> Record:
        """Add a filter; without a ``name`` it is named after its new id.

        Raises:
            SetFailure: ``invalidProperties``.
        """
        id_ = self._new_id()
        if "name" not in document:
            document = {**document, "name": id_}
        record = Record(id_, validate(self.kind, document), read_only=False)
        self._check_name(record)
        self.records.append(record)
        return record

    def replace(self, id_: str, document: Mapping[str, Any]) -> Record:
        """Replace the filter ``id_`` by ``document`` (keeping its id and its place); without a
        ``name`` it is named after its id.

        Raises:
            SetFailure: ``notFound``, ``forbidden`` or ``invalidProperties``.
        """
        index = self._index(id_)
        if "name" not in document:
            document = {**document, "name": id_}
        record = Record(id_, validate(self.kind, document), read_only=False)
        self._check_name(record)
        self.records[index] = record
        return record

    def destroy(self, id_: str) -> None:
        """Remove the filter ``id_``.

        Raises:
            SetFailure: ``notFound`` or ``forbidden``.
        """
        del self.records[self._index(id_)]

    @property
    def changed(self) -> bool:
        """Whether anything differs from the store."""
        return self.records != self.base

    def _check_name(self, record: Record) -> None:
        others = [
            *self.store._config["milter"],
            *self.store._config["hook"],
            *(r for kind in KINDS if kind != self.kind for r in self.store._api[kind]),
            *self.records,
        ]
        for other in others:
            if other.id != record.id and other.filter.name == record.filter.name:
                where = "the config file's" if other.read_only else "API"
                raise SetFailure(
                    "invalidProperties",
                    f"name: {record.filter.name!r} is already the name of {where} filter "
                    f"{other.id}",
                    ["name"],
                )

    def _new_id(self) -> str:
        taken = {r.id for kind in KINDS for r in self.store.records(kind)}
        taken.update(r.id for r in self.records)
        while True:
            candidate = API_ID_PREFIX + secrets.token_hex(4)
            if candidate not in taken:
                return candidate


#: What identifies one version of a file: inode, modification time, size.
_Stamp = tuple[int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        status = path.stat()
    except OSError:  # missing; or unreadable, which reading or writing will report
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def _config_records(config: Config) -> dict[Kind, list[Record]]:
    return {
        "milter": [Record(config_id(m.name), m, read_only=True) for m in config.milter],
        "hook": [Record(config_id(h.name), h, read_only=True) for h in config.hook],
    }


def _load(path: Path, config: Mapping[Kind, Sequence[Record]]) -> dict[Kind, list[Record]]:
    """The API filters of the state file at ``path``; none when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ConfigError(
                f"{path}: cannot create the state file: directory {path.parent} does not exist"
            ) from None
        return {kind: [] for kind in KINDS}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the state file: {exc.strerror}") from None
    try:
        version = msgspec.json.decode(data, type=_StateVersion).version
        if version != STATE_VERSION:
            raise ConfigError(
                f"{path}: state file version {version}; this milterbridge reads version "
                f"{STATE_VERSION}"
            )
        state = msgspec.json.decode(data, type=_StateFile, dec_hook=dec_hook)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(_describe(path, exc)) from None
    api: dict[Kind, list[Record]] = {
        "milter": [Record(e.id, e.filter, read_only=False) for e in state.milters],
        "hook": [Record(e.id, e.filter, read_only=False) for e in state.hooks],
    }
    seen: set[str] = set()
    for kind, key in _STATE_KEYS:
        for index, record in enumerate(api[kind]):
            where = f"{path}: {key}[{index}].id"
            if not _ID.fullmatch(record.id) or record.id.startswith(CONFIG_ID_PREFIX):
                raise ConfigError(
                    f"{where}: {record.id!r} is not an API filter id (letters, digits, '-' and "
                    f"'_', not starting with {CONFIG_ID_PREFIX!r})"
                )
            if record.id in seen:
                raise ConfigError(f"{where}: duplicate id {record.id!r}")
            seen.add(record.id)
    _check_names(config, api, path)
    return api


def _check_names(
    config: Mapping[Kind, Sequence[Record]],
    api: Mapping[Kind, Sequence[Record]],
    path: Path | None,
) -> None:
    """Raise ConfigError when two filters share a name (the config file checked its own)."""
    first: dict[str, str] = {}
    for kind in KINDS:
        for index, record in enumerate(config[kind]):
            first[record.filter.name] = f"the config file's {kind}[{index}]"
    for kind, key in _STATE_KEYS:
        for index, record in enumerate(api[kind]):
            name = record.filter.name
            if name in first:
                raise ConfigError(
                    f"{path or 'API filters'}: {key}[{index}].filter.name: duplicate filter name "
                    f"{name!r} (also {first[name]})"
                )
            first[name] = f"the state file's {key}[{index}]"


def _encode_state(api: Mapping[Kind, Iterable[Record]]) -> bytes:
    state = _StateFile(
        version=STATE_VERSION,
        milters=[
            _MilterEntry(r.id, r.filter)
            for r in api["milter"]
            if isinstance(r.filter, MilterFilter)
        ],
        hooks=[_HookEntry(r.id, r.filter) for r in api["hook"] if isinstance(r.filter, HookFilter)],
    )
    return msgspec.json.format(msgspec.json.encode(state, enc_hook=enc_hook), indent=2) + b"\n"


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash at any point leaves the old file or the new
    one (see the module docstring); synchronous on purpose."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    try:
        _sync_directory(directory)
    except OSError as exc:
        # Too late to fail: the new file is in place, and every reader -- this process, the
        # other workers, the next start -- already sees it. Refusing the change now would
        # leave the filters in memory disagreeing with the file. Only its survival of a power
        # cut is in doubt, which the operator should hear about.
        log.warning("state_file_sync_failed", path=str(path), error=exc.strerror or str(exc))


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


__all__ = [
    "API_ID_PREFIX",
    "CONFIG_ID_PREFIX",
    "KINDS",
    "STATE_VERSION",
    "Draft",
    "FilterStore",
    "Kind",
    "Record",
    "SetFailure",
    "StoreWriteError",
    "config_id",
    "property_names",
    "to_document",
    "validate",
]
