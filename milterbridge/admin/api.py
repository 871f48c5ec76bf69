"""``POST /api``: the JMAP-shaped admin API (RFC 8620) over the :class:`FilterStore`.

One request carries method calls, answered in order in one response; a call may use the result
of an earlier one (``"#ids": {"resultOf": ..., "name": ..., "path": "/ids"}``, RFC 8620 §3.7)
and the ids of objects created earlier in the same request (``"#new1"``). Methods:
``x:MtaMilter/get|set|query``, ``x:MtaHook/get|set|query`` (the reference's names) and
``Core/echo``; the ``x:`` methods need ``urn:stalwart:jmap`` in ``using``, as in the reference's
examples. There are no accounts: ``accountId`` is optional, any value is accepted and echoed.

What goes wrong is answered at the level RFC 8620 puts it:

- the HTTP request itself (no or a wrong token: 401; too many of those from one address: 429;
  not POST: 405) by HTTP;
- the request object (not JSON, nested too deeply, not a Request, an unknown capability, too
  many calls) by a 400 problem document whose ``type`` is ``urn:ietf:params:jmap:error:<type>``;
  a body over the HTTP layer's size limit by the same document with type ``limit`` (``"limit":
  "maxSizeRequest"``) and status 413, the status HTTP has for exactly this, which also tells the
  client why the connection closes after it (RFC 8620 fixes no status for ``limit``);
- one method call (unknown method, bad arguments, a permission the token lacks) by an
  ``["error", {"type": ...}, callId]`` answer to that call, the others going on;
- one create, update or destroy of a ``/set`` by a SetError in ``notCreated``, ``notUpdated`` or
  ``notDestroyed``, the others going on.

Objects are the filters as their config tables are written (camelCase, ``"30s"``), with two
server-set properties: ``id`` and ``readOnly`` (true for the config file's filters, which
``/set`` refuses with ``forbidden``). ``readOnly`` is a plain property name, not an ``x:`` one:
it sits inside objects that are ours already, and a colon would need quoting in every JSON
pointer and ``--field`` that names it. A ``Value`` secret is never returned: its ``secret`` is
``null`` in every answer; where a secret comes from (a variable, a file) is not secret and is
shown.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, TypeVar

import msgspec
import structlog
import trio

from ..config import AdminToken, Filter
from .auth import (
    Authenticator,
    AuthFailures,
    ObjectType,
    Principal,
    SetOperation,
    may_set_something,
)
from .auth import method_permissions as _method_permissions
from .http import Request, Response
from .store import (
    FilterStore,
    Kind,
    Record,
    SetFailure,
    StoreWriteError,
    property_names,
    to_document,
)

log = structlog.get_logger("milterbridge.admin")

CORE_CAPABILITY: Final = "urn:ietf:params:jmap:core"
#: The capability the reference puts its ``x:`` management methods under.
MANAGEMENT_CAPABILITY: Final = "urn:stalwart:jmap"
CAPABILITIES: Final = frozenset({CORE_CAPABILITY, MANAGEMENT_CAPABILITY})
#: Method calls in one request (RFC 8620's maxCallsInRequest); more is a ``limit`` error.
MAX_CALLS_IN_REQUEST: Final = 64
#: Deepest nesting of arrays and objects in a request (the request object is level 1, a
#: method's arguments level 4). A filter object needs about 8 levels, and a query filter 2 per
#: nested operator; deeper is refused as ``notJSON`` before anything walks it, so that no
#: recursion in the API (nor msgspec's, which gives up near 1,000 levels) can fail on it.
MAX_JSON_DEPTH: Final = 64
#: The name RFC 8620 gives the request-size limit, in the ``limit`` problem document.
SIZE_LIMIT_NAME: Final = "maxSizeRequest"
#: There is no Session resource whose state could change; the value is fixed.
SESSION_STATE: Final = "0"
_ERROR_PREFIX: Final = "urn:ietf:params:jmap:error:"

#: Object type of each method prefix, and the store's kind for it.
OBJECT_TYPES: Final[Mapping[str, tuple[ObjectType, Kind]]] = {
    "x:MtaMilter": ("MtaMilter", "milter"),
    "x:MtaHook": ("MtaHook", "hook"),
}
#: Server-set properties: in answers, never settable.
ID_PROPERTY: Final = "id"
READ_ONLY_PROPERTY: Final = "readOnly"
#: Condition properties of ``/query`` filters, per kind; all conditions of one object must hold.
FILTER_CONDITIONS: Final[Mapping[Kind, tuple[str, ...]]] = {
    "milter": ("name", "hostname", "enable", READ_ONLY_PROPERTY),
    "hook": ("name", "url", "enable", READ_ONLY_PROPERTY),
}
#: Properties ``/query`` sorts on, per kind.
SORT_PROPERTIES: Final[Mapping[Kind, tuple[str, ...]]] = {
    "milter": ("name", "hostname", "port", READ_ONLY_PROPERTY),
    "hook": ("name", "url", READ_ONLY_PROPERTY),
}
_COLLATIONS: Final[Mapping[str | None, Callable[[str], str]]] = {
    None: str.lower,
    "i;ascii-casemap": str.lower,
    "i;unicode-casemap": str.casefold,
    "i;octet": str,
}

_json = msgspec.json.Encoder()
_T = TypeVar("_T")


# --- wire objects ---------------------------------------------------------------------------


class _Struct(msgspec.Struct, rename="camel", kw_only=True):
    pass


class JmapRequest(_Struct):
    """RFC 8620 §3.3 (other members are ignored, as the RFC leaves them to extensions)."""

    using: list[str]
    method_calls: list[tuple[str, dict[str, Any], str]]
    created_ids: dict[str, str] | None = None


class JmapResponse(_Struct, omit_defaults=True):
    """RFC 8620 §3.4; ``createdIds`` only when the request had it."""

    method_responses: list[tuple[str, Any, str]]
    session_state: str
    created_ids: dict[str, str] | None = None


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 7807 problem document, as RFC 8620 §3.6.1 answers a request it refuses."""

    type: str
    status: int
    detail: str
    limit: str | None = None


class MethodErrorBody(msgspec.Struct, omit_defaults=True):
    type: str
    description: str | None = None


class SetError(msgspec.Struct, omit_defaults=True):
    type: str
    description: str | None = None
    properties: list[str] | None = None


class _Args(_Struct, forbid_unknown_fields=True):
    account_id: str | None = None


class GetArgs(_Args, forbid_unknown_fields=True):
    ids: list[str] | None = None
    properties: list[str] | None = None


class SetArgs(_Args, forbid_unknown_fields=True):
    if_in_state: str | None = None
    create: dict[str, dict[str, Any]] | None = None
    update: dict[str, dict[str, Any]] | None = None
    destroy: list[str] | None = None


class Comparator(_Struct, forbid_unknown_fields=True):
    property: str
    is_ascending: bool = True
    collation: str | None = None


class QueryArgs(_Args, forbid_unknown_fields=True):
    filter: dict[str, Any] | None = None
    sort: list[Comparator] | None = None
    position: int = 0
    anchor: str | None = None
    anchor_offset: int = 0
    limit: Annotated[int, msgspec.Meta(ge=0)] | None = None
    calculate_total: bool = False


class ResultReference(_Struct, forbid_unknown_fields=True):
    result_of: str
    name: str
    path: str


class GetResponse(_Struct):
    account_id: str | None
    state: str
    #: ``list`` on the wire (the name would shadow the builtin here).
    items: list[dict[str, Any]] = msgspec.field(name="list")
    not_found: list[str]


class SetResponse(_Struct):
    account_id: str | None
    old_state: str
    new_state: str
    created: dict[str, dict[str, Any]] | None
    updated: dict[str, None] | None
    destroyed: list[str] | None
    not_created: dict[str, SetError] | None
    not_updated: dict[str, SetError] | None
    not_destroyed: dict[str, SetError] | None


class QueryResponse(_Struct, omit_defaults=True):
    account_id: str | None
    query_state: str
    can_calculate_changes: bool
    position: int
    ids: list[str]
    total: int | None = None


class MethodError(Exception):
    """A method call that fails as a whole (RFC 8620 §3.6.2 and the per-method errors)."""

    def __init__(self, type_: str, description: str | None = None) -> None:
        super().__init__(description or type_)
        self.type = type_
        self.description = description


class RequestError(Exception):
    """A request refused as a whole (RFC 8620 §3.6.1): answered 400 with a problem document."""

    def __init__(self, type_: str, detail: str, limit: str | None = None) -> None:
        super().__init__(detail)
        self.type = type_
        self.detail = detail
        self.limit = limit


# --- the endpoint ---------------------------------------------------------------------------


class AdminApi:
    """``/api``: authentication, the request object, then each method call in order.

    Args:
        store: the filters the calls read and change.
        tokens: ``[[admin.token]]``; their secrets are read here, once.
    """

    def __init__(self, store: FilterStore, tokens: Sequence[AdminToken]) -> None:
        self.store = store
        self.authenticator = Authenticator(tokens)
        self.failures = AuthFailures(trio.current_time)

    async def __call__(self, request: Request) -> Response:
        """Answer one HTTP request to ``/api``."""
        principal = self.authorize(request)
        if isinstance(principal, Response):
            return principal
        if request.method != "POST":
            return _problem_response(
                Problem("about:blank", 405, "POST a JMAP request to /api"), [("Allow", "POST")]
            )
        try:
            jmap = _parse_request(request)
            response = await self.execute(principal, jmap)
        except RequestError as exc:
            return self._request_error(principal, exc, 400)
        return Response(200, _json.encode(response), "application/json")

    def refuse(self, request: Request, status: int, detail: str) -> Response:
        """The answer to a request the HTTP layer refuses before reading it whole (413: its
        body is too large; 408: it came too slowly). The caller is authenticated first, so that
        without a valid token nothing is learnt but 401 (or 429)."""
        principal = self.authorize(request)
        if isinstance(principal, Response):
            return principal
        if status == 413:
            return self._request_error(
                principal, RequestError("limit", detail, limit=SIZE_LIMIT_NAME), 413
            )
        return _problem_response(Problem("about:blank", status, detail))

    def authorize(self, request: Request) -> Principal | Response:
        """The caller of ``request``, or the answer refusing it: 429 while its address is over
        the limit of failed authentications (the token not even looked at), 401 for no token or
        an unknown one. Each refusal counts for the address; see :class:`AuthFailures`."""
        client = request.client
        wait = self.failures.retry_after(client)
        if wait is not None:
            self._auth_failed(client, "too many failed authentications", failed=False)
            seconds = math.ceil(wait)
            return _problem_response(
                Problem(
                    "about:blank",
                    429,
                    f"too many failed authentications from this address; retry in {seconds}s",
                ),
                [("Retry-After", str(seconds))],
            )
        principal = self.authenticator.authenticate(request.headers.get("authorization"))
        if principal is not None:
            return principal
        presented = "authorization" in request.headers
        self._auth_failed(client, "unknown token" if presented else "no bearer token", failed=True)
        challenge = 'Bearer realm="milterbridge"'
        if presented:
            challenge += ', error="invalid_token"'
        return _problem_response(
            Problem("about:blank", 401, "a valid bearer token is needed"),
            [("WWW-Authenticate", challenge)],
        )

    def _auth_failed(self, client: str, reason: str, *, failed: bool) -> None:
        """Count the refusal; log it unless the address had a line within the last second
        (``count``: the refusals the line stands for; never the presented value)."""
        count = self.failures.refused(client, failed=failed)
        if count is not None:
            log.warning(
                "admin_auth_failed",
                client=client,
                reason=reason,
                count=count,
                limited=self.failures.retry_after(client) is not None,
            )

    def _request_error(self, principal: Principal, exc: RequestError, status: int) -> Response:
        log.info(
            "admin_api_request_refused", token=principal.name, type=exc.type, detail=exc.detail
        )
        return _problem_response(Problem(_ERROR_PREFIX + exc.type, status, exc.detail, exc.limit))

    async def execute(self, principal: Principal, request: JmapRequest) -> JmapResponse:
        """Run the method calls of one request, in order.

        Raises:
            RequestError: ``unknownCapability`` or ``limit``.
        """
        unknown = [item for item in request.using if item not in CAPABILITIES]
        if unknown:
            raise RequestError(
                "unknownCapability",
                f"unknown capability {unknown[0]!r}; this server has "
                f"{', '.join(sorted(CAPABILITIES))}",
            )
        if len(request.method_calls) > MAX_CALLS_IN_REQUEST:
            raise RequestError(
                "limit",
                f"{len(request.method_calls)} method calls; at most {MAX_CALLS_IN_REQUEST}",
                limit="maxCallsInRequest",
            )
        call = _Calls(self.store, principal, request)
        for name, arguments, call_id in request.method_calls:
            await call.run(name, arguments, call_id)
        return JmapResponse(
            method_responses=call.responses,
            session_state=SESSION_STATE,
            created_ids=dict(call.created_ids) if request.created_ids is not None else None,
        )


def _parse_request(request: Request) -> JmapRequest:
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise RequestError("notJSON", "the request's Content-Type must be application/json")
    too_deep = RequestError(
        "notJSON", f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
    )
    try:
        jmap = msgspec.json.decode(request.body, type=JmapRequest)
    except msgspec.ValidationError as exc:
        raise RequestError("notRequest", f"not a JMAP Request object: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RequestError("notJSON", f"the body is not JSON: {exc}") from None
    except RecursionError:  # msgspec's own limit, far above ours
        raise too_deep from None
    # The request, methodCalls and a call are the three levels above a call's arguments.
    if any(_nests_deeper(arguments, MAX_JSON_DEPTH - 3) for _, arguments, _ in jmap.method_calls):
        raise too_deep
    return jmap


def _nests_deeper(value: Any, levels: int) -> bool:
    """Whether ``value`` nests lists and dicts more than ``levels`` deep (itself is one level).

    A loop, not recursion: it runs on what may be too deep for recursion.
    """
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > levels:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _problem_response(problem: Problem, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(
        problem.status, _json.encode(problem), "application/problem+json", headers=headers or []
    )


# --- one request's calls ----------------------------------------------------------------------


class _Calls:
    """The state of one request: the answers so far and the creation ids seen."""

    def __init__(self, store: FilterStore, principal: Principal, request: JmapRequest) -> None:
        self.store = store
        self.principal = principal
        self.using = frozenset(request.using)
        self.responses: list[tuple[str, Any, str]] = []
        self.created_ids: dict[str, str] = dict(request.created_ids or {})

    async def run(self, name: str, arguments: dict[str, Any], call_id: str) -> None:
        try:
            answer_name, answer = await self._dispatch(name, arguments)
        except MethodError as exc:
            self.responses.append(("error", MethodErrorBody(exc.type, exc.description), call_id))
            return
        self.responses.append((answer_name, answer, call_id))

    async def _dispatch(self, name: str, arguments: dict[str, Any]) -> tuple[str, Any]:
        if name == "Core/echo":
            return name, arguments
        prefix, _, method = name.partition("/")
        types = OBJECT_TYPES.get(prefix)
        if types is None or method not in ("get", "set", "query"):
            raise MethodError("unknownMethod", f"no method {name!r}")
        if MANAGEMENT_CAPABILITY not in self.using:
            raise MethodError(
                "unknownMethod", f"{name} needs {MANAGEMENT_CAPABILITY!r} in the request's using"
            )
        object_type, kind = types
        arguments = self._resolve_references(arguments)
        if method == "get":
            get = _convert(arguments, GetArgs)
            self._require(object_type, "get")
            return name, self._get(kind, get)
        if method == "query":
            query = _convert(arguments, QueryArgs)
            self._require(object_type, "query")
            return name, _query(self.store, kind, query)
        changes = _convert(arguments, SetArgs)
        operations: list[SetOperation] = [
            op for op in ("create", "update", "destroy") if getattr(changes, op)
        ]
        if not operations and not may_set_something(self.principal, object_type):
            raise MethodError("forbidden", f"token {self.principal.name!r} may not change {prefix}")
        self._require(object_type, "set", operations)
        return name, await self._set(kind, prefix, changes)

    def _require(
        self, object_type: ObjectType, method: str, operations: Sequence[SetOperation] = ()
    ) -> None:
        missing = self.principal.missing(_method_permissions(object_type, method, operations))
        if missing:
            raise MethodError(
                "forbidden",
                f"token {self.principal.name!r} lacks the permission {', '.join(missing)}",
            )

    def _resolve_references(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Replace each ``"#name": ResultReference`` by the value it points at (§3.7)."""
        if not any(key.startswith("#") for key in arguments):
            return arguments
        resolved = dict(arguments)
        for key, value in arguments.items():
            if not key.startswith("#"):
                continue
            plain = key[1:]
            if plain in arguments:
                raise MethodError("invalidArguments", f"both {plain!r} and {key!r} are given")
            reference = _convert(value, ResultReference)
            resolved[plain] = self._follow(reference)
            del resolved[key]
        return resolved

    def _follow(self, reference: ResultReference) -> Any:
        for name, answer, call_id in self.responses:
            if call_id == reference.result_of and name == reference.name:
                builtins = msgspec.to_builtins(answer)
                try:
                    return _evaluate_pointer(builtins, reference.path)
                except LookupError as exc:
                    raise MethodError("invalidResultReference", str(exc)) from None
        raise MethodError(
            "invalidResultReference",
            f"no earlier answer {reference.name!r} to call {reference.result_of!r}",
        )

    def _real_id(self, id_: str) -> str:
        """``#creationId`` -> the id created for it in this request (or given in createdIds)."""
        if id_.startswith("#"):
            return self.created_ids.get(id_[1:], id_)
        return id_

    # --- methods -----------------------------------------------------------------------------

    def _get(self, kind: Kind, args: GetArgs) -> GetResponse:
        properties = _check_properties(kind, args.properties)
        found: list[Record] = []
        not_found: list[str] = []
        if args.ids is None:
            found = self.store.records(kind)
        else:
            seen: set[str] = set()
            for given in args.ids:
                id_ = self._real_id(given)
                if id_ in seen:
                    continue
                seen.add(id_)
                record = self.store.find(kind, id_)
                if record is None:
                    not_found.append(given)
                else:
                    found.append(record)
        return GetResponse(
            account_id=args.account_id,
            state=self.store.state(kind),
            items=[render(record, properties) for record in found],
            not_found=not_found,
        )

    async def _set(self, kind: Kind, prefix: str, args: SetArgs) -> SetResponse:
        store = self.store
        async with store.lock:
            old_state = store.state(kind)
            if args.if_in_state is not None and args.if_in_state != old_state:
                raise MethodError(
                    "stateMismatch", f"the state is {old_state}, not {args.if_in_state}"
                )
            draft = store.draft(kind)
            created: dict[str, dict[str, Any]] = {}
            updated: dict[str, None] = {}
            destroyed: list[str] = []
            not_created: dict[str, SetError] = {}
            not_updated: dict[str, SetError] = {}
            not_destroyed: dict[str, SetError] = {}
            creations: dict[str, str] = {}
            doomed = {self._real_id(id_) for id_ in args.destroy or ()}
            for creation_id, document in (args.create or {}).items():
                try:
                    record = draft.create(_without_server_set(document, None))
                except SetFailure as exc:
                    not_created[creation_id] = _set_error(exc)
                    continue
                created[creation_id] = render(record)
                creations[creation_id] = record.id
                self.created_ids[creation_id] = record.id
            for given, patch in (args.update or {}).items():
                id_ = self._real_id(given)
                try:
                    current = draft.document(id_)  # notFound and forbidden come first
                    if id_ in doomed:
                        raise SetFailure("willDestroy", f"{id_} is destroyed by this same call")
                    draft.replace(id_, apply_patch(current, _without_server_set(patch, id_)))
                except SetFailure as exc:
                    not_updated[given] = _set_error(exc)
                    continue
                updated[id_] = None
            for given in args.destroy or ():
                id_ = self._real_id(given)
                try:
                    draft.destroy(id_)
                except SetFailure as exc:
                    not_destroyed[given] = _set_error(exc)
                    continue
                destroyed.append(id_)
            try:
                store.commit(draft)
            except StoreWriteError as exc:
                for creation_id in creations:
                    del self.created_ids[creation_id]
                log.error("admin_state_write_failed", error=str(exc))
                raise MethodError("serverFail", f"{exc}; nothing was changed") from None
            if created or updated or destroyed:
                log.info(
                    "admin_filters_changed",
                    type=prefix,
                    token=self.principal.name,
                    created=sorted(creations.values()),
                    updated=sorted(updated),
                    destroyed=destroyed,
                )
            return SetResponse(
                account_id=args.account_id,
                old_state=old_state,
                new_state=store.state(kind),
                created=created or None,
                updated=updated or None,
                destroyed=destroyed or None,
                not_created=not_created or None,
                not_updated=not_updated or None,
                not_destroyed=not_destroyed or None,
            )


def _convert(value: Any, type_: type[_T]) -> _T:
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        raise MethodError("invalidArguments", str(exc)) from None


def _set_error(exc: SetFailure) -> SetError:
    properties = exc.properties if exc.type == "invalidProperties" else None
    return SetError(exc.type, exc.description, properties)


def _without_server_set(document: Mapping[str, Any], id_: str | None) -> dict[str, Any]:
    """``document`` without ``id`` and ``readOnly``, which may only repeat what they are (an
    object copied from a ``/get`` answer is then accepted); anything else is invalid."""
    result = dict(document)
    if ID_PROPERTY in result:
        if id_ is None or result[ID_PROPERTY] != id_:
            raise SetFailure("invalidProperties", "id: set by the server", [ID_PROPERTY])
        del result[ID_PROPERTY]
    if READ_ONLY_PROPERTY in result:
        if result[READ_ONLY_PROPERTY] is not False:
            raise SetFailure(
                "invalidProperties",
                "readOnly: set by the server (filters from the API are never read-only)",
                [READ_ONLY_PROPERTY],
            )
        del result[READ_ONLY_PROPERTY]
    return result


def _check_properties(kind: Kind, properties: list[str] | None) -> list[str] | None:
    if properties is None:
        return None
    known = {ID_PROPERTY, READ_ONLY_PROPERTY, *property_names(kind)}
    unknown = [item for item in properties if item not in known]
    if unknown:
        raise MethodError("invalidArguments", f"unknown properties: {', '.join(unknown)}")
    return properties


def render(record: Record, properties: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON object of a filter as ``/get`` returns it: ``id``, its properties with every
    ``Value`` secret's text replaced by null, ``readOnly``; only ``properties`` (and always
    ``id``) when given."""
    document: dict[str, Any] = {
        ID_PROPERTY: record.id,
        **_hide_secrets(to_document(record.filter)),
        READ_ONLY_PROPERTY: record.read_only,
    }
    if properties is None:
        return document
    wanted = {ID_PROPERTY, *properties}
    return {key: value for key, value in document.items() if key in wanted}


def _hide_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        hidden = {key: _hide_secrets(item) for key, item in value.items()}
        if hidden.get("@type") == "Value" and "secret" in hidden:
            hidden["secret"] = None
        return hidden
    if isinstance(value, list):
        return [_hide_secrets(item) for item in value]
    return value


# --- /set patches -----------------------------------------------------------------------------


def apply_patch(document: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply an RFC 8620 §5.3 PatchObject to a copy of ``document``.

    Each key is a JSON pointer without its leading slash (``port``, ``httpAuth/username``);
    its value replaces what is there, null removes it (the property's default applies). Every
    part but the last must exist and be an object; a key may not be a prefix of another.

    Raises:
        SetFailure: ``invalidPatch``.
    """
    keys = list(patch)
    for key in keys:
        for other in keys:
            if other != key and other.startswith(key + "/"):
                raise SetFailure("invalidPatch", f"{key!r} and {other!r} overlap")
    result = copy.deepcopy(document)
    for key, value in patch.items():
        parts = [_unescape(part) for part in key.split("/")]
        if any(part == "" for part in parts):
            raise SetFailure("invalidPatch", f"{key!r} is not a property path")
        parent: Any = result
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(parent, dict) or part not in parent:
                where = "/".join(parts[: depth + 1])
                raise SetFailure("invalidPatch", f"{key!r}: {where!r} does not exist")
            parent = parent[part]
        if not isinstance(parent, dict):
            raise SetFailure("invalidPatch", f"{key!r}: points inside a value that is no object")
        if value is None:
            parent.pop(parts[-1], None)
        else:
            parent[parts[-1]] = value
    return result


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _evaluate_pointer(value: Any, pointer: str) -> Any:
    """RFC 8620 §3.7's JSON pointer: ``*`` maps the rest over an array, flattening arrays."""
    if pointer == "":
        return value
    if not pointer.startswith("/"):
        raise LookupError(f"path {pointer!r} does not start with '/'")
    parts = [_unescape(part) for part in pointer[1:].split("/")]
    return _walk(value, parts, pointer)


def _walk(value: Any, parts: list[str], pointer: str) -> Any:
    if not parts:
        return value
    part, rest = parts[0], parts[1:]
    if isinstance(value, list):
        if part == "*":
            items: list[Any] = []
            for item in value:
                found = _walk(item, rest, pointer)
                items.extend(found if isinstance(found, list) else [found])
            return items
        if part.isdigit() and int(part) < len(value):
            return _walk(value[int(part)], rest, pointer)
    elif isinstance(value, dict) and part in value:
        return _walk(value[part], rest, pointer)
    raise LookupError(f"path {pointer!r}: nothing at {part!r}")


# --- /query -----------------------------------------------------------------------------------


def _query(store: FilterStore, kind: Kind, args: QueryArgs) -> QueryResponse:
    matches = _filter(kind, args.filter) if args.filter is not None else _anything
    records = [record for record in store.records(kind) if matches(record)]
    for comparator in reversed(args.sort or ()):
        records.sort(key=_sort_key(kind, comparator), reverse=not comparator.is_ascending)
    ids = [record.id for record in records]
    total = len(ids)
    if args.anchor is not None:
        if args.anchor not in ids:
            raise MethodError("anchorNotFound", f"{args.anchor} is not in the results")
        position = max(0, ids.index(args.anchor) + args.anchor_offset)
    elif args.position < 0:
        position = max(0, total + args.position)
    else:
        position = args.position
    end = total if args.limit is None else position + args.limit
    return QueryResponse(
        account_id=args.account_id,
        query_state=store.state(kind),
        can_calculate_changes=False,
        position=position,
        ids=ids[position:end],
        total=total if args.calculate_total else None,
    )


def _anything(record: Record) -> bool:
    return True


def _filter(kind: Kind, spec: Any) -> Callable[[Record], bool]:
    """A FilterOperator (``{"operator": "AND"|"OR"|"NOT", "conditions": [...]}``) or a
    FilterCondition as a predicate.

    Conditions: ``name``, ``hostname`` (milters), ``url`` (hooks): case-insensitive substring;
    ``enable``: false selects the filters switched off (every outcome of ``enable`` is the
    literal false), true the others; ``readOnly``: the config file's filters or the API's.
    """
    if not isinstance(spec, dict):
        raise MethodError("invalidArguments", "a filter is an object")
    if "operator" in spec:
        operator, conditions = spec.get("operator"), spec.get("conditions")
        if set(spec) != {"operator", "conditions"} or not isinstance(conditions, list):
            raise MethodError(
                "invalidArguments", "a FilterOperator has exactly operator and conditions"
            )
        parts = [_filter(kind, item) for item in conditions]
        if operator == "AND":
            return lambda record: all(part(record) for part in parts)
        if operator == "OR":
            return lambda record: any(part(record) for part in parts)
        if operator == "NOT":
            return lambda record: not any(part(record) for part in parts)
        raise MethodError("unsupportedFilter", f"operator {operator!r} (AND, OR or NOT)")
    tests: list[Callable[[Record], bool]] = []
    for key, value in spec.items():
        if key not in FILTER_CONDITIONS[kind]:
            raise MethodError(
                "unsupportedFilter",
                f"no filter on {key!r}; conditions: {', '.join(FILTER_CONDITIONS[kind])}",
            )
        if key in ("enable", READ_ONLY_PROPERTY):
            if not isinstance(value, bool):
                raise MethodError("invalidArguments", f"filter {key}: true or false")
            tests.append(_flag_test(key, value))
        else:
            if not isinstance(value, str):
                raise MethodError("invalidArguments", f"filter {key}: a string")
            tests.append(_text_test(key, value))
    return lambda record: all(test(record) for test in tests)


def _flag_test(key: str, wanted: bool) -> Callable[[Record], bool]:
    if key == READ_ONLY_PROPERTY:
        return lambda record: record.read_only is wanted
    return lambda record: (not switched_off(record.filter)) is wanted


def _text_test(key: str, text: str) -> Callable[[Record], bool]:
    needle = text.casefold()

    def test(record: Record) -> bool:
        value = getattr(record.filter, key, None)
        return isinstance(value, str) and needle in value.casefold()

    return test


def switched_off(item: Filter) -> bool:
    """Whether a filter's ``enable`` can only be false: every ``then`` and the ``else`` are
    the literal ``false`` (how an operator turns a filter off without removing it)."""
    rules = item.enable
    outcomes = [rules.else_, *(match.then for match in rules.match)]
    return all(outcome.strip() == "false" for outcome in outcomes)


def _sort_key(kind: Kind, comparator: Comparator) -> Callable[[Record], Any]:
    if comparator.property not in SORT_PROPERTIES[kind]:
        raise MethodError(
            "unsupportedSort",
            f"cannot sort on {comparator.property!r}; "
            f"properties: {', '.join(SORT_PROPERTIES[kind])}",
        )
    fold = _COLLATIONS.get(comparator.collation)
    if fold is None:
        raise MethodError(
            "unsupportedSort",
            f"collation {comparator.collation!r}; collations: "
            f"{', '.join(c for c in _COLLATIONS if c is not None)}",
        )
    name = comparator.property

    def key(record: Record) -> Any:
        if name == READ_ONLY_PROPERTY:
            return (False, record.read_only)
        value = getattr(record.filter, name, None)
        if value is None:
            return (True, "")  # no hostname (a Unix socket): after the others
        return (False, fold(value) if isinstance(value, str) else value)

    return key


__all__ = [
    "CAPABILITIES",
    "CORE_CAPABILITY",
    "MANAGEMENT_CAPABILITY",
    "MAX_CALLS_IN_REQUEST",
    "MAX_JSON_DEPTH",
    "OBJECT_TYPES",
    "SIZE_LIMIT_NAME",
    "AdminApi",
    "JmapRequest",
    "JmapResponse",
    "apply_patch",
    "render",
    "switched_off",
]
