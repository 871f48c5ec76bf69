"""The CLI verbs of the admin API: ``get``, ``create``, ``query``, ``update``, ``delete``.

Each verb is one JMAP request to a running bridge's ``/api`` (design §10), spelled as the
reference's CLI spells it::

    milterbridge create mta-milter --field hostname=10.0.0.5 --field port=11332
    milterbridge get mta-milter api-1a2b3c4d
    milterbridge query mta-hook --filter url=example.org
    milterbridge update mta-milter api-1a2b3c4d --field timeoutCommand=10s
    milterbridge delete mta-milter --ids api-1a2b3c4d,api-5e6f7a8b

The token is read from an environment variable (``--token-env``, by default
``MILTERBRIDGE_ADMIN_TOKEN``), never from an argument: arguments show in ``ps`` and in the
shell's history.

``--field KEY=VALUE``: VALUE is taken as JSON when it parses as JSON (``11332``, ``false``,
``'["data"]'``, ``'{"else":"true"}'``), as a string otherwise (``v6``, ``30s``); quote a string
that looks like JSON (``'name="123"'``). A dotted KEY reaches into an object
(``httpAuth.@type=Bearer``): ``create`` builds the nested object, ``update`` patches just that
member (RFC 8620 patch paths). ``update KEY=null`` puts a property back to its default.

Results are printed as JSON on stdout. Exit status: 0 done; 1 the API refused (a method error,
a SetError, an HTTP error) or could not be reached, with the reason on stderr; 2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import httpx
import msgspec
import trio

DEFAULT_URL: Final = "http://127.0.0.1:8900/api"
DEFAULT_TOKEN_ENV: Final = "MILTERBRIDGE_ADMIN_TOKEN"
#: The reference CLI's object names and their method prefixes.
OBJECT_NAMES: Final[Mapping[str, str]] = {
    "mta-milter": "x:MtaMilter",
    "mta-hook": "x:MtaHook",
}
ADMIN_COMMANDS: Final = ("get", "create", "query", "update", "delete")
USING: Final = ["urn:ietf:params:jmap:core", "urn:stalwart:jmap"]
#: Longest wait for the API's answer.
TIMEOUT_SECONDS: Final = 30.0

_JMAP_ERROR: Final = "urn:ietf:params:jmap:error:"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    """An argument the parser accepted but that cannot be used (exit status 2)."""


class ApiError(Exception):
    """The API refused or could not be reached (exit status 1)."""


def add_admin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the five verbs on the ``milterbridge`` parser's subcommands.

    Each sets ``admin_verb`` in the parsed arguments; hand those to :func:`run_admin_command`.
    """

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text)
        parser.set_defaults(admin_verb=name)
        parser.add_argument("object", choices=list(OBJECT_NAMES), help="object type")
        return parser

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL})")
        parser.add_argument(
            "--token-env",
            default=DEFAULT_TOKEN_ENV,
            metavar="NAME",
            help=f"environment variable holding the bearer token (default {DEFAULT_TOKEN_ENV})",
        )

    field_help = "KEY=VALUE (VALUE as JSON if it parses, else a string; KEY may be dotted)"

    get = verb("get", "show filters of the admin API (all, or those with the given ids)")
    get.add_argument("ids", nargs="*", metavar="ID")
    get.add_argument("--properties", metavar="A,B", help="only these properties (and id)")
    common(get)

    create = verb("create", "create a filter through the admin API")
    create.add_argument(
        "--field", action="append", default=[], metavar="KEY=VALUE", help=field_help
    )
    common(create)

    query = verb("query", "list the filters matching conditions")
    query.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="condition on name, hostname (milters), url (hooks), enable, readOnly; repeatable",
    )
    query.add_argument(
        "--sort", action="append", default=[], metavar="PROPERTY[:desc]", help="repeatable"
    )
    query.add_argument("--position", type=int, default=0, metavar="N")
    query.add_argument("--limit", type=int, metavar="N")
    query.add_argument("--ids-only", action="store_true", help="print the ids, not the objects")
    common(query)

    update = verb("update", "change a filter created through the admin API")
    update.add_argument("id", metavar="ID")
    update.add_argument(
        "--field", action="append", default=[], metavar="KEY=VALUE", help=field_help
    )
    common(update)

    delete = verb("delete", "delete filters created through the admin API")
    delete.add_argument("--ids", required=True, metavar="ID,ID", help="comma-separated ids")
    common(delete)


def run_admin_command(args: argparse.Namespace) -> int:
    """Run the verb in ``args`` (from a parser :func:`add_admin_commands` filled); the exit
    status."""
    return trio.run(admin_command, args)


async def admin_command(args: argparse.Namespace) -> int:
    """:func:`run_admin_command` inside a running trio loop."""
    where = f"{args.admin_verb} {args.object}"
    try:
        token = _token(args.token_env)
        return await _VERBS[args.admin_verb](args, token)
    except UsageError as exc:
        print(f"milterbridge: {where}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"milterbridge: {where}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _token(variable: str) -> str:
    token = os.environ.get(variable, "")
    if not token:
        raise UsageError(
            f"set {variable} to the admin API token (or name another variable with --token-env)"
        )
    return token


# --- the verbs --------------------------------------------------------------------------------


async def _get(args: argparse.Namespace, token: str) -> int:
    arguments: dict[str, Any] = {"ids": args.ids or None}
    if args.properties:
        arguments["properties"] = _split(args.properties)
    method = f"{OBJECT_NAMES[args.object]}/get"
    [(_, answer)] = await call_api(args.url, token, [(method, arguments)])
    _print(answer["list"])
    if answer["notFound"]:
        raise ApiError(f"not found: {', '.join(answer['notFound'])}")
    return EXIT_OK


async def _create(args: argparse.Namespace, token: str) -> int:
    document = build_object(parse_fields(args.field))
    method = f"{OBJECT_NAMES[args.object]}/set"
    [(_, answer)] = await call_api(args.url, token, [(method, {"create": {"new": document}})])
    failed = (answer.get("notCreated") or {}).get("new")
    if failed is not None:
        raise ApiError(describe_set_error(failed))
    _print(answer["created"]["new"])
    return EXIT_OK


async def _query(args: argparse.Namespace, token: str) -> int:
    prefix = OBJECT_NAMES[args.object]
    arguments: dict[str, Any] = {"position": args.position, "calculateTotal": True}
    if args.filter:
        arguments["filter"] = build_object(parse_fields(args.filter))
    if args.sort:
        arguments["sort"] = [_comparator(item) for item in args.sort]
    if args.limit is not None:
        if args.limit < 0:
            raise UsageError(f"--limit {args.limit}: must be 0 or more")
        arguments["limit"] = args.limit
    calls: list[tuple[str, dict[str, Any]]] = [(f"{prefix}/query", arguments)]
    if not args.ids_only:
        reference = {"resultOf": "c0", "name": f"{prefix}/query", "path": "/ids"}
        calls.append((f"{prefix}/get", {"#ids": reference}))
    answers = await call_api(args.url, token, calls)
    _print(answers[0][1]["ids"] if args.ids_only else answers[1][1]["list"])
    return EXIT_OK


async def _update(args: argparse.Namespace, token: str) -> int:
    patch = build_patch(parse_fields(args.field))
    if not patch:
        raise UsageError("nothing to change: give at least one --field")
    method = f"{OBJECT_NAMES[args.object]}/set"
    [(_, answer)] = await call_api(args.url, token, [(method, {"update": {args.id: patch}})])
    failed = (answer.get("notUpdated") or {}).get(args.id)
    if failed is not None:
        raise ApiError(describe_set_error(failed))
    _print(sorted(answer.get("updated") or {}))
    return EXIT_OK


async def _delete(args: argparse.Namespace, token: str) -> int:
    ids = _split(args.ids)
    if not ids:
        raise UsageError("--ids: give at least one id")
    method = f"{OBJECT_NAMES[args.object]}/set"
    [(_, answer)] = await call_api(args.url, token, [(method, {"destroy": ids})])
    _print(answer.get("destroyed") or [])
    failed = answer.get("notDestroyed") or {}
    if failed:
        raise ApiError(
            "; ".join(f"{id_}: {describe_set_error(error)}" for id_, error in failed.items())
        )
    return EXIT_OK


_VERBS = {
    "get": _get,
    "create": _create,
    "query": _query,
    "update": _update,
    "delete": _delete,
}


# --- arguments ----------------------------------------------------------------------------------


def parse_fields(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``KEY=VALUE`` arguments as (key path, value) pairs; see the module docstring.

    Raises:
        UsageError: an item without ``=`` or with an empty key part.
    """
    fields: list[tuple[list[str], Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        path = key.split(".")
        if not sep or not all(path):
            raise UsageError(f"{item!r}: expected KEY=VALUE (KEY may be dotted: a.b=VALUE)")
        try:
            value: Any = msgspec.json.decode(text)
        except msgspec.DecodeError:
            value = text
        fields.append((path, value))
    return fields


def build_object(fields: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """The object the fields describe, dotted keys as nested objects.

    Raises:
        UsageError: two fields that cannot both hold (``a=1`` and ``a.b=2``, or a key twice).
    """
    document: dict[str, Any] = {}
    for path, value in fields:
        target = document
        for depth, part in enumerate(path[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"{'.'.join(path[: depth + 1])} is given a value and members")
            target = child
        if path[-1] in target:
            raise UsageError(f"{'.'.join(path)} is given twice (or a value and members)")
        target[path[-1]] = value
    return document


def build_patch(fields: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """An RFC 8620 PatchObject: each dotted key becomes a path (``httpAuth/username``).

    Raises:
        UsageError: a key given twice.
    """
    patch: dict[str, Any] = {}
    for path, value in fields:
        key = "/".join(part.replace("~", "~0").replace("/", "~1") for part in path)
        if key in patch:
            raise UsageError(f"{'.'.join(path)} is given twice")
        patch[key] = value
    return patch


def _comparator(text: str) -> dict[str, Any]:
    name, _, order = text.partition(":")
    if not name or order not in ("", "asc", "desc"):
        raise UsageError(f"--sort {text!r}: expected PROPERTY, PROPERTY:asc or PROPERTY:desc")
    return {"property": name, "isAscending": order != "desc"}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- the call -----------------------------------------------------------------------------------


class _Answer(msgspec.Struct):
    method_responses: list[tuple[str, dict[str, Any], str]] = msgspec.field(name="methodResponses")


async def call_api(
    url: str, token: str, calls: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """POST one JMAP request with ``calls`` (call ids ``c0``, ``c1``, ...); each answer's
    name and arguments, in order.

    Raises:
        ApiError: the API could not be reached, refused the request, or answered a call with
            an error (the first such error).
    """
    request = {
        "using": USING,
        "methodCalls": [
            [name, arguments, f"c{index}"] for index, (name, arguments) in enumerate(calls)
        ],
    }
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            response = await client.post(url, content=msgspec.json.encode(request), headers=headers)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot call {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        raise ApiError(f"HTTP {response.status_code}: {_reason(response)}")
    try:
        answer = msgspec.json.decode(response.content, type=_Answer)
    except msgspec.DecodeError as exc:
        raise ApiError(f"{url} did not answer a JMAP response: {exc}") from None
    results: list[tuple[str, dict[str, Any]]] = []
    for name, arguments, _call_id in answer.method_responses:
        if name == "error":
            description = arguments.get("description")
            kind = arguments.get("type", "error")
            raise ApiError(f"{kind}: {description}" if description else str(kind))
        results.append((name, arguments))
    return results


def _reason(response: httpx.Response) -> str:
    """The ``detail`` of a problem document, else the body's text (or the status phrase)."""
    try:
        problem = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        problem = None
    if isinstance(problem, dict) and isinstance(problem.get("detail"), str):
        kind = str(problem.get("type", ""))
        detail: str = problem["detail"]
        if kind.startswith(_JMAP_ERROR):
            return f"{kind.removeprefix(_JMAP_ERROR)}: {detail}"
        return detail
    return response.text.strip() or response.reason_phrase


def describe_set_error(error: Mapping[str, Any]) -> str:
    """``invalidProperties (port): port: Expected `int` >= 1`` from a SetError."""
    kind = str(error.get("type", "error"))
    properties = error.get("properties")
    if properties:
        kind += f" ({', '.join(str(p) for p in properties)})"
    description = error.get("description")
    return f"{kind}: {description}" if description else kind


def _print(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


__all__ = [
    "ADMIN_COMMANDS",
    "DEFAULT_TOKEN_ENV",
    "DEFAULT_URL",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "OBJECT_NAMES",
    "add_admin_commands",
    "admin_command",
    "build_object",
    "build_patch",
    "call_api",
    "describe_set_error",
    "parse_fields",
    "run_admin_command",
]
