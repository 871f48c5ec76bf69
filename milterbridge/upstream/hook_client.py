"""The HTTP side of the MTA hooks: one POST per hook call, its answer as a milter filter's answer.

One ``HookClient`` serves the whole process. It keeps two connection pools (httpx on trio, HTTP/1.1
with keep-alive): one verifying TLS against the system's CA store (or the context it is given),
one that accepts any certificate, for hooks with ``allowInvalidCerts``. Pools are shared by all
hooks and sessions, so a busy bridge does not pay a TCP and TLS handshake per call.

A call (design §7):

* **Request.** POST to the hook's URL with ``Content-Type: application/json``, the hook's
  ``httpHeaders``, an Authorization header from ``httpAuth`` (Basic or Bearer; it replaces an
  Authorization given in ``httpHeaders``), and the request document (upstream/hook_request.py)
  streamed from the session's spool, with a Content-Length. The secrets are resolved once per
  configured hook and kept only in the header value; no log line or failure text holds them,
  nor the URL (which may carry credentials) or any message content.
* **One deadline.** Connecting, TLS, sending and reading the whole answer happen under the hook's
  ``timeout`` as one trio cancel scope (so tests can drive it with trio's clocks): a server that
  accepts and then drips its answer byte by byte times out like one that never answers. httpx's
  own timeouts are off.
* **Answer.** Only a 2xx status counts; redirects are not followed (a 3xx is an ``http_status``
  failure: a hook URL that moved is a configuration error, and following it would send the
  message to wherever the redirect points). The body is read as it arrives and abandoned -- the
  connection closed -- as soon as it exceeds ``maxResponseSize`` (or when the declared
  Content-Length already does). ``Accept-Encoding: identity`` asks for an uncompressed body, so
  the limit is what the bridge holds in memory and a small compressed answer cannot inflate. The
  Content-Type is not checked; the body must be a valid answer (upstream/hook_response.py).
* **Failure.** Every way a call fails is an ``UpstreamFailure`` for the session's error policy:
  the deadline -> ``command_timeout`` (``data_timeout`` at the data stage); refused connection,
  unresolvable name, or an ``httpAuth`` secret that can no longer be read -> ``refused``;
  handshake or certificate failure -> ``tls``; an answer over the size limit -> ``oversize``;
  the connection lost mid-exchange -> ``closed``; a non-2xx status -> ``http_status``; a
  malformed HTTP answer, bad JSON or an answer that cannot be carried out -> ``invalid_response``.
  Cancellation from outside and our own bugs (httpx's LocalProtocolError) propagate unchanged.

Not retried: a keep-alive connection the server closes just as a call reuses it fails that call
(``closed``); httpx drops idle connections the server has already closed, which narrows the window
to the race itself.
"""

from __future__ import annotations

import base64
import ssl
from types import TracebackType
from typing import Final, Self

import httpx
import trio

from ..config import HookFilter, HttpAuthBasic, HttpAuthBearer
from ..engine.hook_answer import HookAnswer, HookResponseError, answer_from_response
from .failure import FailureKind, UpstreamFailure, local_shortage
from .hook_request import HookInput, HookRequestBody
from .hook_response import decode_response

#: How many hooks' prepared headers are kept (a reload that replaces every hook starts afresh).
_HEADER_CACHE_MAX: Final = 256


class HookClient:
    """The process's HTTP client for MTA hooks; ``call`` is safe from any number of tasks.

    Args:
        ssl_context: the verifying TLS context; by default the system's CA store
            (``ssl.create_default_context()``). Hooks with ``allowInvalidCerts`` never use it.
        max_connections: per pool, the most connections open at once (calls beyond wait for one,
            within their timeout); as many are kept alive between calls.
        keepalive_expiry: seconds an idle connection is kept for reuse.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
        keepalive_expiry: float = 5.0,
    ) -> None:
        verified = ssl_context if ssl_context is not None else ssl.create_default_context()
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        # trust_env off: proxy variables must not route mail content elsewhere, and the CA
        # store is the one chosen here.
        self._verified = httpx.AsyncClient(
            verify=verified, limits=limits, timeout=None, follow_redirects=False, trust_env=False
        )
        self._unverified = httpx.AsyncClient(
            verify=unverified, limits=limits, timeout=None, follow_redirects=False, trust_env=False
        )
        # Keyed by id(): the entry holds the hook itself, so the id cannot be reused while it is
        # cached, and a reloaded hook (a new object) gets its secrets resolved afresh.
        self._headers: dict[int, tuple[HookFilter, list[tuple[bytes, bytes]]]] = {}

    async def aclose(self) -> None:
        """Close both pools and every connection in them."""
        try:
            await self._verified.aclose()
        finally:
            await self._unverified.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def call(self, hook: HookFilter, request: HookInput) -> HookAnswer:
        """Ask ``hook`` about ``request.stage``; its answer as a milter reply and edits.

        Raises:
            UpstreamFailure: the call failed (kinds in the module docstring); the session
                applies the hook's ``tempFailOnError``.
        """
        body = HookRequestBody(request)
        data: bytes | None = None
        with trio.move_on_after(hook.timeout):
            data = await self._exchange(hook, request.stage, body)
        if data is None:
            kind = (
                FailureKind.DATA_TIMEOUT if request.stage == "data" else FailureKind.COMMAND_TIMEOUT
            )
            raise UpstreamFailure(
                kind, hook.name, request.stage, f"no complete answer within {hook.timeout:g}s"
            )
        try:
            return answer_from_response(decode_response(data), request.headers)
        except HookResponseError as exc:
            raise UpstreamFailure(
                FailureKind.INVALID_RESPONSE, hook.name, request.stage, str(exc)
            ) from None

    async def _exchange(self, hook: HookFilter, stage: str, body: HookRequestBody) -> bytes:
        """POST the request and read the answer's body; every failure but the deadline raised
        as an UpstreamFailure."""
        length = await body.content_length()
        headers = [*self._prepared_headers(hook, stage), (b"Content-Length", str(length).encode())]
        client = self._unverified if hook.allow_invalid_certs else self._verified
        limit = int(hook.max_response_size)
        try:
            async with client.stream("POST", hook.url, content=body, headers=headers) as response:
                if not response.is_success:
                    raise _failure(hook, stage, FailureKind.HTTP_STATUS, _status_text(response))
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    cause = f"declared a {declared}-byte answer, over the {limit}-byte limit"
                    raise _failure(hook, stage, FailureKind.OVERSIZE, cause)
                data = await _read_capped(response, limit)
                if data is None:
                    cause = f"answer over the {limit}-byte limit (stopped reading)"
                    raise _failure(hook, stage, FailureKind.OVERSIZE, cause)
                return data
        except httpx.LocalProtocolError:
            raise
        except httpx.HTTPError as exc:
            kind, cause = classify_http_error(exc)
            raise _failure(hook, stage, kind, cause) from None

    def _prepared_headers(self, hook: HookFilter, stage: str) -> list[tuple[bytes, bytes]]:
        """The hook's request headers, secrets resolved once per configured hook."""
        cached = self._headers.get(id(hook))
        if cached is not None and cached[0] is hook:
            return cached[1]
        try:
            authorization = _authorization(hook)
        except (ValueError, OSError) as exc:  # the secret was readable when the config loaded
            cause = f"cannot resolve the httpAuth secret: {exc}"
            raise UpstreamFailure(FailureKind.REFUSED, hook.name, stage, cause) from None
        replaced = _OURS | ({"authorization"} if authorization is not None else set())
        headers = [
            (name.encode(), value.encode())
            for name, value in hook.http_headers.items()
            if name.lower() not in replaced
        ]
        if authorization is not None:
            headers.append((b"Authorization", authorization))
        headers += [
            (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json"),
            (b"Accept-Encoding", b"identity"),
        ]
        if len(self._headers) >= _HEADER_CACHE_MAX:
            self._headers.pop(next(iter(self._headers)))
        self._headers[id(hook)] = (hook, headers)
        return headers


#: Request headers the client sets itself (a hook's ``httpHeaders`` cannot replace them).
_OURS: Final = frozenset(
    {"content-type", "content-length", "accept", "accept-encoding", "transfer-encoding"}
)


async def _read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The response body, or None as soon as it exceeds ``limit`` bytes.

    Stopping is a cancellation, not a ``break``: it lands in httpcore's innermost read, so every
    generator in httpx's chain ends by the exception (httpcore closes the connection on the way)
    instead of being left half-consumed for the garbage collector.
    """
    data = bytearray()
    over = False
    with trio.CancelScope() as reading:
        async for chunk in response.aiter_bytes():
            if over:
                continue  # already buffered pieces, until the next read sees the cancellation
            data += chunk
            if len(data) > limit:
                over = True
                data.clear()
                reading.cancel()
    return None if over else bytes(data)


def _authorization(hook: HookFilter) -> bytes | None:
    auth = hook.http_auth
    if isinstance(auth, HttpAuthBasic):
        pair = f"{auth.username}:{auth.secret.reveal()}".encode()
        return b"Basic " + base64.b64encode(pair)
    if isinstance(auth, HttpAuthBearer):
        return b"Bearer " + auth.bearer_token.reveal().encode()
    return None


def _failure(hook: HookFilter, stage: str, kind: FailureKind, cause: str) -> UpstreamFailure:
    return UpstreamFailure(kind, hook.name, stage, cause)


def _status_text(response: httpx.Response) -> str:
    text = f"HTTP {response.status_code}"
    phrase = httpx.codes.get_reason_phrase(response.status_code)  # ours, not the server's words
    if phrase:
        text += f" {phrase}"
    if response.is_redirect:
        text += " (redirects are not followed)"
    return text


def classify_http_error(exc: httpx.HTTPError) -> tuple[FailureKind, str]:
    """The failure class and a short cause for an error httpx raised during a call."""
    tls = _ssl_error(exc)
    if tls is not None:
        return FailureKind.TLS, f"TLS: {_ssl_text(tls)}"
    text = _chain_text(exc)
    if isinstance(exc, httpx.ConnectError) and local_shortage(exc) is not None:
        # Out of descriptors or memory ourselves: not the hook's fault (see failure.py).
        return FailureKind.LOCAL_RESOURCES, f"cannot connect, the bridge is short of: {text}"
    if isinstance(exc, httpx.ConnectError | httpx.ProxyError | httpx.UnsupportedProtocol):
        return FailureKind.REFUSED, f"cannot connect: {text}"
    if isinstance(exc, httpx.TimeoutException):
        return FailureKind.COMMAND_TIMEOUT, f"timed out: {text}"
    if isinstance(exc, httpx.RemoteProtocolError):
        lowered = text.lower()
        if "disconnect" in lowered or "closed" in lowered:
            return FailureKind.CLOSED, f"connection lost: {text}"
        return FailureKind.INVALID_RESPONSE, f"malformed HTTP answer: {text}"
    if isinstance(exc, httpx.TransportError):
        return FailureKind.CLOSED, f"connection lost: {text}"
    return FailureKind.INVALID_RESPONSE, f"unusable HTTP answer: {text}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return seen


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    for link in _chain(exc):
        if isinstance(link, ssl.SSLError):
            return link
    return None


def _ssl_text(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return exc.reason or str(exc)


def _chain_text(exc: BaseException) -> str:
    """The distinct messages along the cause chain, outermost first (one line, short)."""
    parts: list[str] = []
    for link in _chain(exc):
        text = str(link).strip()
        if text and not any(text in part for part in parts):
            parts.append(text)
    return ": ".join(parts)[:300] or type(exc).__name__


__all__ = ["HookClient", "classify_http_error"]
