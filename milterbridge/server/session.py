"""One MTA connection: we play the filter towards the MTA and the MTA towards every milter.

Every reply-expecting command is a sync point (design §4): the session sends it, with its
macros, to every joined milter still in the connection or message, waits for all of them in
parallel (each under its own timeouts, enforced by its client), merges their final replies
(engine.verdicts) and answers the MTA -- so a reject at end-of-headers or a SKIP on the first body
chunk reaches the MTA at that very packet. At end-of-message the milters' edits are merged into
one script (engine.edits), sent with the final reply in one write, and PROGRESS keeps the MTA
waiting while slow milters think.

Failure policy (design §7): a milter that fails (``UpstreamFailure``) is logged once and closed;
with tempFailOnError it answers TEMPFAIL at that stage and at every later stage of the connection
(as Postfix makes a failed milter's default reply sticky), without it the milter leaves the
session and the others decide. If every milter that tried to join failed to connect or negotiate
and none is left, the session closes the MTA connection, so that the MTA's own
milter_default_action decides.

HTTP hooks (design §4, §8) are asked in the same fan-out as the milters: at each envelope stage
they list where their ``enable`` holds (``auth`` just before MAIL, for an authenticated client),
and at end-of-message for ``data``, with the body the session kept in its spool. A hook's
``accept`` is a continue (it does not end its part in the message, unlike a milter's ACCEPT), and
the edits it returns before end-of-message are applied at end-of-message.

Lifetime: the session owns its stream and its milters' connections; every task lives in a nursery
of the session, so an MTA that vanishes at any byte cancels all of it and leaves nothing behind.
Exactly one ``session_end`` line is logged.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Protocol

import structlog
import trio
from prometheus_client import CollectorRegistry

from .. import logs
from ..config import HookFilter, MilterFilter
from ..engine.apply import MessageState
from ..engine.edits import merge_edits
from ..engine.hook_answer import HookAnswer
from ..engine.verdicts import (
    STAGE_REPLIES,
    Stage,
    StageReply,
    StageResult,
    Verdict,
    merge_stage,
    verdict_of,
)
from ..metrics import Metrics
from ..milter import (
    ALL_ACTIONS,
    CLOSED,
    Abort,
    Accept,
    Body,
    Command,
    Connect,
    Connection,
    Continue,
    Data,
    DelRcpt,
    EndOfHeaders,
    EndOfMessage,
    ErrorKind,
    Header,
    Helo,
    Macro,
    Mail,
    Negotiated,
    OptNeg,
    Progress,
    ProtocolError,
    Quarantine,
    Quit,
    QuitNoClose,
    Rcpt,
    Reply,
    ReplyCode,
    Role,
    Skip,
    Tempfail,
    Unknown,
)
from ..milter import Protocol as MilterProtocol
from ..transport import MilterStream
from ..upstream import FailureKind, UpstreamFailure, UpstreamMilter, connect_upstream
from ..upstream.hook_request import HookInput
from .circuit import CircuitBreakers
from .filters import (
    FilterSlot,
    History,
    HookSlot,
    OptionsCache,
    build_hook_slots,
    build_slots,
    joins_at,
    listed_at,
)
from .options import answer_mta, offer_for_upstreams
from .passes import MessageView, PassScript, advance, body_chunks, replay_message
from .report import MessageReport, edit_counts
from .spool import MessageSpool, SpoolError
from .variables import session_variables

log = structlog.get_logger("milterbridge.session")

#: How often the MTA hears PROGRESS while end-of-message waits on slow milters: well below
#: Postfix's 300 s content timeout and Sendmail's 10 s per-read timeout (protocol notes §5.6).
PROGRESS_INTERVAL = 3.0
#: How long closing the milters' connections may take when a session ends.
GOODBYE_SECONDS = 2.0


def new_session_id() -> str:
    return secrets.token_hex(6)


class CloseMta(Exception):
    """Every milter failed to join: drop the MTA connection so its default action applies."""


@dataclass
class SessionStats:
    """What the session_end line reports."""

    client: str | None = None
    messages: int = 0
    aborts: int = 0
    commands: int = 0
    outcome: str = "closed"
    error: str | None = None
    started: float = field(default_factory=trio.current_time)


class HookCaller(Protocol):
    """What the session needs of the HTTP hook client (upstream.hook_client.HookClient)."""

    async def call(self, hook: HookFilter, request: HookInput) -> HookAnswer: ...


class ClientCounts:
    """Open MTA sessions per client address, for the hook request's ``activeConnections``."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def opened(self, address: str) -> None:
        self._open[address] = self._open.get(address, 0) + 1

    def closed(self, address: str) -> None:
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)

    def __getitem__(self, address: str) -> int:
        return self._open.get(address, 0)


Outcome = list[Reply] | UpstreamFailure
_ALL_CONTINUE = StageResult(Continue(), Verdict.CONTINUE)
_Call = Callable[[UpstreamMilter], Awaitable[list[Reply]]]
_Target = tuple[FilterSlot, UpstreamMilter]
#: Hooks to call at one command, each with the hook stages it is called for, in order.
_HookCalls = list[tuple[HookSlot, list[str]]]


class MtaSession:
    """Drives one MTA connection through the codec in the filter role."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_packet: int,
        session_id: str,
        filters: Sequence[MilterFilter] = (),
        hooks: Sequence[HookFilter] = (),
        hook_client: HookCaller | None = None,
        options_cache: OptionsCache | None = None,
        spool_memory: int = 1024 * 1024,
        spool_directory: str | None = None,
        client_counts: ClientCounts | None = None,
        metrics: Metrics | None = None,
        breakers: CircuitBreakers | None = None,
        max_headers: int = 1000,
        max_recipients: int = 1000,
        idle_timeout: float = 600.0,
        defer_message_verdicts: bool = False,
    ) -> None:
        if hooks and hook_client is None:
            raise ValueError("hooks need a hook client")
        self.session_id = session_id
        self.milter = MilterStream(stream, Connection(Role.FILTER, max_packet=max_packet))
        self.stats = SessionStats()
        self.slots = build_slots(filters)
        self.hooks = build_hook_slots(hooks)
        #: The pass that gets the message live from the MTA (the lowest configured).
        self.first_pass = min([f.pass_ for f in filters] + [h.pass_ for h in hooks], default=1)
        #: The MTA's macros for end-of-headers, replayed to later passes.
        self.eoh_macro: Macro | None = None
        #: Filters in observe mode, by name.
        self.observers = frozenset(
            [slot.name for slot in self.slots if slot.observing]
            + [hook.name for hook in self.hooks if hook.observing]
        )
        self.hook_client = hook_client
        self.spool = MessageSpool(spool_memory, spool_directory)
        self.client_counts = ClientCounts() if client_counts is None else client_counts
        self.counted_client: str | None = None
        if metrics is None:  # a session of its own (tests, `send`): count into the void
            names = [*(f.name for f in filters), *(h.name for h in hooks)]
            metrics = Metrics(CollectorRegistry(), names, process_metrics=False)
        self.metrics = metrics
        #: The message in progress, from MAIL to its end.
        self.report: MessageReport | None = None
        #: When the MTA's latest command arrived: the MTA waits from then on.
        self.received_at = 0.0
        #: Cancelled by abandon(): everything the session does for the MTA runs inside it.
        self._work = trio.CancelScope()
        #: Shared by the process's sessions; a session of its own gets private ones.
        self.breakers = CircuitBreakers() if breakers is None else breakers
        self.max_headers = max_headers
        self.max_recipients = max_recipients
        self.idle_timeout = idle_timeout
        #: ``deferMessageVerdicts``: headers and body are not waited for (see options.py).
        self.defer_message_verdicts = defer_message_verdicts
        #: A limit refused the message: the answer to its remaining steps (design §12).
        self.refusal: StageResult | None = None
        self.cache: OptionsCache = {} if options_cache is None else options_cache
        self.history = History()
        self.offer: OptNeg | None = None
        self.macro: Macro | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.authenticated = False
        #: Every macro the MTA sent in this connection, the latest value of each (for enable).
        self.macros: dict[str, str] = {}

    async def run(self) -> None:
        """Serve the connection until it ends; never raises for a peer's misbehaviour."""
        with structlog.contextvars.bound_contextvars(session_id=self.session_id):
            self.metrics.session_opened()
            try:
                with self._work:
                    await self._serve()
                if self._work.cancelled_caught:
                    await self._answer_abandoned()
            except ProtocolError as exc:
                if exc.kind is ErrorKind.TRUNCATED:
                    # Closed in the middle of a packet: the MTA went away, it broke nothing.
                    self.stats.outcome, self.stats.error = "connection_lost", str(exc)
                else:
                    self.stats.outcome, self.stats.error = "protocol_error", str(exc)
                    self.metrics.protocol_error("mta")
                    if exc.kind is ErrorKind.OVERSIZE:
                        self._limit_hit("max_mta_packet")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.stats.outcome, self.stats.error = "connection_lost", str(exc) or None
            except CloseMta as exc:
                self.stats.outcome, self.stats.error = "all_filters_failed", str(exc)
            except Exception as exc:  # one session's bug must not end the service
                # Our bug, not a peer's: log it loudly with its traceback, drop this connection
                # (the MTA applies milter_default_action) and keep serving the others.
                self.stats.outcome, self.stats.error = "internal_error", repr(exc)
                log.exception("session_crashed")
            finally:
                # Say goodbye to the milters even when cancelled, but never wait long for it.
                with trio.move_on_after(GOODBYE_SECONDS, shield=True):
                    await self._close_upstreams()
                await trio.aclose_forcefully(self.milter.stream)
                self.spool.reset()
                self._count_client(None)
                self._end_message("aborted")
                self.metrics.session_closed()
                self._log_end()

    def abandon(self) -> None:
        """Stop now (the drain deadline passed): a step in progress is answered TEMPFAIL.

        The MTA then retries that message later; a session idle between commands is simply
        closed. Safe to call at any time, also before ``run`` starts or after it ended.
        """
        self._work.cancel()

    async def _answer_abandoned(self) -> None:
        self.stats.outcome = "abandoned"
        awaiting = self.milter.connection.awaiting
        if awaiting is not None and awaiting is not OptNeg:
            with trio.move_on_after(GOODBYE_SECONDS) as goodbye:
                await self.milter.send(Tempfail())
            if not goodbye.cancelled_caught:
                # The MTA keeps the message and retries it: say so, rather than "aborted".
                self._end_message(Verdict.TEMPFAIL.value)

    # --- the MTA loop -------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            # A bare scope: move_on_after's context-manager generator costs more, every packet.
            with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as idle:
                event = await self.milter.receive()
            if idle.cancelled_caught:
                # An MTA that stopped talking must not hold a session (and its filters'
                # connections) for ever: Postfix never waits that long between packets.
                self.stats.outcome = "idle_timeout"
                self._limit_hit("idle_timeout", seconds=self.idle_timeout)
                return
            self.received_at = trio.current_time()
            if event is CLOSED:
                return
            if logs.TRACE:
                log.debug("mta_packet", packet=type(event).__name__)
            if not isinstance(event, Macro):
                self.stats.commands += 1
            match event:
                case OptNeg():
                    self.offer = event
                    options = [self._live_options(slot) for slot in self.slots]
                    hooks = [slot.config for slot in self.hooks]
                    answer = answer_mta(
                        event,
                        options,
                        hooks,
                        defer_message_verdicts=self.defer_message_verdicts,
                    )
                    await self.milter.send(answer)
                case Macro():
                    self.macro = event
                    for name, value in event.macros:
                        self.macros[_macro_name(name)] = value.decode("utf-8", "replace")
                    continue
                case Quit():
                    self.stats.outcome = "quit"
                    return
                case QuitNoClose():
                    await self._close_upstreams()
                    self.slots = build_slots([slot.config for slot in self.slots])
                    self.hooks = build_hook_slots([slot.config for slot in self.hooks])
                    self.history = History()
                    self.macros = {}
                    self.spool.reset()
                    self._count_client(None)
                case Abort():
                    self.stats.aborts += 1
                    await self._abort()
                case EndOfMessage() if self.refusal is not None:
                    await self._send_if_awaited(self.refusal, Stage.EOM)
                    self._end_message(self.refusal.verdict.value)
                case EndOfMessage():
                    await self._end_of_message(self._take_macro())
                case Body() if self.refusal is not None:
                    await self._send_if_awaited(self.refusal, Stage.BODY)
                case Body():
                    result = await self._answer(Stage.BODY, await self._body(event))
                    self._ended_early(Stage.BODY, result)
                case Command():
                    await self._step(event)
            self.macro = None

    def _live_options(self, slot: FilterSlot) -> Negotiated | None:
        """A milter's options as the MTA negotiation should count them.

        A milter of a later pass is fed the message from the bridge's copy, never live: to the
        MTA it is silent at headers and body (no reply owed), whatever it negotiated.
        """
        options = self.cache.get(slot.name)
        if slot.config.pass_ == self.first_pass:
            return options
        if options is None:
            return Negotiated(6, ALL_ACTIONS, _SILENT_MESSAGE)
        return replace(options, protocol=options.protocol | _SILENT_MESSAGE)

    def _take_macro(self) -> Macro | None:
        macro, self.macro = self.macro, None
        return macro

    async def _step(self, command: Command) -> None:
        """An envelope, header or unknown command: join, replay, fan out, merge, answer."""
        macro = self._take_macro()
        if await self._over_limit(command):
            return
        self._remember(macro, command)
        hooks: _HookCalls = []
        if isinstance(command, Connect | Helo | Mail | Rcpt | Data):
            current = command if isinstance(command, Rcpt) else None
            await self._join(type(command), current)
            if isinstance(command, Mail | Rcpt | Data):
                await self._leave(type(command), current)
            hooks = self._hook_calls(type(command), current)
        stage = Stage.of(type(command))
        outcomes = await self._fan_out(
            lambda client: client.command(macro, command),
            stage=stage,
            message=_in_message(command),
            only_pass=self.first_pass if isinstance(command, Header | EndOfHeaders) else None,
            hooks=hooks,
            current=command if isinstance(command, Rcpt) else None,
        )
        result = await self._answer(stage, outcomes)
        self._ended_early(stage, result)
        if isinstance(command, Rcpt) and not result.recipient_only:
            self.history.recipients.append((macro, command))

    def _remember(self, macro: Macro | None, command: Command) -> None:
        match command:
            case Connect():
                self.history.connect = (macro, command)
                self.stats.client = command.address.decode("ascii", "replace") or None
                self._count_client(self.stats.client)
            case Helo():
                self.history.helo = (macro, command)
            case Mail():
                self._new_message()
                self.report = MessageReport(self.received_at)
                self.history.mail = (macro, command)
                self.authenticated = any(
                    name == b"{auth_authen}" and value
                    for name, value in (macro.macros if macro else ())
                )
            case Header():
                self.headers.append((command.name, command.value))
            case EndOfHeaders():
                self.eoh_macro = macro

    def _new_message(self) -> None:
        self._end_message("aborted")
        self.refusal = None
        self.history.new_message()
        self.headers = []
        self.spool.reset()
        for slot in self.slots:
            slot.reset_message()
        for hook in self.hooks:
            hook.reset_message()

    def _count_client(self, address: str | None) -> None:
        """Keep ``client_counts`` true: this session counts for at most one address."""
        if self.counted_client is not None:
            self.client_counts.closed(self.counted_client)
        self.counted_client = address
        if address is not None:
            self.client_counts.opened(address)

    # --- limits -------------------------------------------------------------------------

    async def _over_limit(self, command: Command) -> bool:
        """Answer the command from a limit, without asking any filter (design §12)."""
        stage: Stage | None = None
        if self.refusal is not None and isinstance(command, Header | EndOfHeaders):
            stage = Stage.of(type(command))
            result = self.refusal
        elif isinstance(command, Header) and len(self.headers) >= self.max_headers:
            # Refused for the rest of the message, answered at the first step the MTA awaits
            # (with no-reply headers that is end-of-headers or later).
            self.refusal = result = StageResult(TOO_MANY_HEADERS, Verdict.REJECT)
            self._limit_hit("max_headers", count=len(self.headers))
            stage = Stage.HEADER
        elif isinstance(command, Rcpt) and len(self.history.recipients) >= self.max_recipients:
            # 452 for this recipient only: the client sends the rest in a later transaction.
            result = StageResult(TOO_MANY_RECIPIENTS, Verdict.TEMPFAIL, recipient_only=True)
            self._limit_hit("max_recipients", count=len(self.history.recipients))
            stage = Stage.RCPT
        if stage is None:
            return False
        await self._send_if_awaited(result, stage)
        return True

    def _limit_hit(self, limit: str, *, quiet: bool = False, **fields: object) -> None:
        """Log and count a limit; ``quiet`` ones (a normal event, such as a large body going to
        disk) are logged at info rather than warning."""
        (log.info if quiet else log.warning)("limit_hit", limit=limit, **fields)
        self.metrics.limit_hit(limit)

    # --- joining ------------------------------------------------------------------------

    async def _join(self, command: type[Command], current: Rcpt | None) -> None:
        """Connect the milters that join at this command and replay what they missed."""
        candidates = [
            slot for slot in self.slots if not slot.joined and not slot.gone and slot.sticky is None
        ]
        if not candidates:
            return
        variables = session_variables(self.history, self.macros, current)
        joining = [
            slot
            for slot in candidates
            if joins_at(slot.config, command, self.authenticated, variables)
        ]
        if not joining:
            return
        async with trio.open_nursery() as nursery:
            for slot in joining:
                if self.breakers.admit(slot.name):
                    nursery.start_soon(self._join_one, slot, command)
                else:
                    self._circuit_open(slot)
        # Observers never decide anything, also not whether the MTA connection is dropped.
        enforcing = [slot for slot in joining if not slot.observing]
        failed = [slot for slot in enforcing if slot.client is None]
        live = any(s.live() for s in self.slots if not s.observing) or any(
            hook.usable and not hook.observing for hook in self.hooks
        )
        if failed and len(failed) == len(enforcing) and not live:
            raise CloseMta(f"no filter could be joined ({', '.join(s.name for s in failed)})")

    async def _join_one(self, slot: FilterSlot, command: type[Command]) -> None:
        negotiated = self.milter.connection.negotiated
        assert self.offer is not None and negotiated is not None
        try:
            client = await connect_upstream(
                slot.endpoint, offer_for_upstreams(self.offer, negotiated)
            )
        except UpstreamFailure as failure:
            self._failed(slot, failure)
            return
        slot.client = client
        slot.connected_at = trio.current_time()
        self.cache[slot.name] = client.negotiated
        self.metrics.filter_up(slot.name, True)
        self.breakers.succeeded(slot.name)
        for macro, replayed in self.history.before(command):
            if client.done_for_connection or (
                client.done_for_message and not isinstance(replayed, Mail)
            ):
                return  # its answer so far ended its part: libmilter would drop the rest
            try:
                replies = await client.command(macro, replayed)
            except UpstreamFailure as failure:
                self._failed(slot, failure)
                return
            self._replayed(slot, replayed, replies)

    async def _leave(self, command: type[Command], current: Rcpt | None) -> None:
        """Joined milters whose ``enable`` is false at this listed stage leave the message.

        Once in the message they are sent ABORT (nothing at MAIL, where it has not begun) and
        their pending verdicts for it are dropped (design §8).
        """
        variables: Mapping[str, str | list[str]] | None = None
        for slot in self.slots:
            client = slot.live()
            if client is None or slot.left_message or slot.sticky is not None:
                continue
            if not listed_at(slot.config, command, self.authenticated):
                continue
            if variables is None:
                variables = session_variables(self.history, self.macros, current)
            if slot.config.enable.evaluate(variables):
                continue
            slot.reset_message()
            slot.left_message = True
            if command is not Mail:
                try:
                    await client.abort()
                except UpstreamFailure as failure:
                    self._failed(slot, failure)

    def _replayed(self, slot: FilterSlot, command: Command, replies: list[Reply]) -> None:
        """A refusal of a replayed command counts at the current stage (design §8)."""
        final = replies[-1] if replies else None
        if (
            slot.observing
            or final is None
            or isinstance(final, Continue | Accept)
            or not isinstance(final, STAGE_REPLIES)
        ):
            return
        if isinstance(command, Rcpt):
            slot.refused_recipients.append(command.address)
        elif isinstance(command, Mail):
            slot.sticky_message = final
        else:
            slot.sticky = final

    def _failed(self, slot: FilterSlot | HookSlot, failure: UpstreamFailure) -> None:
        log.warning(
            "filter_error",
            filter=slot.name,
            stage=failure.stage,
            kind=failure.kind.value,
            cause=failure.cause,
            policy="observe"
            if slot.observing
            else "tempfail"
            if slot.config.temp_fail_on_error
            else "skip",
        )
        self.metrics.filter_failed(slot.name, failure.kind.value)
        if failure.kind in _PROTOCOL_FAILURES:
            self.metrics.protocol_error("filter")
        if failure.kind in _UNREACHABLE:
            self.metrics.filter_up(slot.name, False)
        if self.report is not None:
            self.report.failed(slot.name, failure.kind.value)
        connected_at = None
        if isinstance(slot, FilterSlot):
            connected_at = slot.connected_at if slot.client is not None else None
            slot.client = None
        if failure.kind is not FailureKind.LOCAL_RESOURCES:  # the filter is not to blame
            self.breakers.failed(slot.name, connected_at)
        if slot.config.temp_fail_on_error and not slot.observing:
            slot.sticky = Tempfail()
        else:
            slot.gone = True

    def _circuit_open(self, slot: FilterSlot | HookSlot) -> None:
        """Its circuit is open: its error policy applies now, without trying it."""
        log.info("filter_skipped", filter=slot.name, reason="circuit_open")
        self.metrics.filter_failed(slot.name, FailureKind.CIRCUIT_OPEN.value)
        if self.report is not None:
            self.report.failed(slot.name, FailureKind.CIRCUIT_OPEN.value)
        if slot.config.temp_fail_on_error and not slot.observing:
            slot.sticky = Tempfail()
        else:
            slot.gone = True

    # --- hooks --------------------------------------------------------------------------

    def _hook_calls(self, command: type[Command], current: Rcpt | None) -> _HookCalls:
        listed = [(slot, slot.stages_at(command, self.authenticated)) for slot in self.hooks]
        listed = [(slot, stages) for slot, stages in listed if stages]
        if not listed:
            return []  # the common case: no variables to build
        variables = session_variables(self.history, self.macros, current)
        calls: _HookCalls = []
        for slot, stages in listed:
            if not slot.config.enable.evaluate(variables):
                continue
            if self.breakers.admit(slot.name):
                calls.append((slot, stages))
            else:
                self._circuit_open(slot)
        return calls

    def _hook_input(
        self, stage: str, current: Rcpt | None, view: MessageView | None = None
    ) -> HookInput:
        """The request data for one hook call, from what the MTA told the session so far."""
        history = self.history
        connect = history.connect[1] if history.connect else None
        helo = history.helo[1] if history.helo else None
        mail = history.mail[1] if history.mail else None
        recipients = [r for _, r in history.recipients if isinstance(r, Rcpt)]
        if current is not None:
            recipients.append(current)
        data = stage == "data"
        client = self.stats.client
        # Sendmail writes IPv6 clients as "IPv6:addr", Postfix bare: the hook gets the bare one.
        address = client.removeprefix("IPv6:") if client else None
        return HookInput(
            stage=stage,
            macros=self.macros,
            client_address=address,
            client_port=connect.port if isinstance(connect, Connect) else None,
            client_hostname=connect.hostname.decode("utf-8", "replace")
            if isinstance(connect, Connect)
            else None,
            helo=helo.name.decode("utf-8", "replace") if isinstance(helo, Helo) else None,
            sender=(mail.address, mail.args) if isinstance(mail, Mail) else None,
            recipients=[(r.address, r.args) for r in recipients],
            headers=self._view_headers(view) if data else (),
            body=self._view_body(view) if data else None,
            body_size=self._view_body_size(view) if data else 0,
            active_connections=self.client_counts[client] if client else 0,
        )

    async def _ask_hook(
        self,
        slot: HookSlot,
        stages: list[str],
        current: Rcpt | None,
        view: MessageView | None = None,
    ) -> Outcome:
        """Call one hook for its stages at this command; the first refusal ends the series."""
        assert self.hook_client is not None
        reply: Reply = Continue()
        for stage in stages:
            try:
                request = self._hook_input(stage, current, view)
                answer = await self.hook_client.call(slot.config, request)
            except UpstreamFailure as failure:
                self._failed(slot, failure)
                return failure
            for note in answer.notes:
                log.info("hook_note", filter=slot.name, stage=stage, note=note)
            slot.pending.extend(answer.edits)
            reply = answer.reply
            if type(reply) is not Continue:
                break
        self.metrics.filter_up(slot.name, True)
        # The edits ride along only so that the verdict label can say "quarantine"; the hook's
        # edits reach the script from ``pending``.
        return [*answer.edits, reply]

    def _view_headers(self, view: MessageView | None) -> Sequence[tuple[bytes, bytes]]:
        return self.headers if view is None else view.headers()

    def _view_body(self, view: MessageView | None) -> BinaryIO:
        if view is None or view.body is None:
            return self.spool.reader()
        return io.BytesIO(view.body)

    def _view_body_size(self, view: MessageView | None) -> int:
        if view is None or view.body is None:
            return self.spool.size
        return len(view.body)

    def _needs_whole_message(self) -> bool:
        """Whether the body must be kept: a data hook, or a milter of a later pass."""
        return any(slot.wants_message for slot in self.hooks) or any(
            slot.config.pass_ != self.first_pass and not slot.gone and slot.sticky is None
            for slot in self.slots
        )

    # --- fan-out ------------------------------------------------------------------------

    def _targets(
        self, message: bool, body: bool = False, only_pass: int | None = None
    ) -> list[_Target]:
        """The milters to ask now: joined, healthy, and still in the message if it matters."""
        targets = []
        for slot in self.slots:
            client = slot.live()
            if client is None or slot.sticky is not None or slot.left_message:
                continue
            if only_pass is not None and slot.config.pass_ != only_pass:
                continue
            if message and client.done_for_message:
                continue
            if body and client.skipping_body:
                continue
            targets.append((slot, client))
        return targets

    async def _fan_out(
        self,
        call: _Call,
        *,
        stage: Stage,
        message: bool,
        body: bool = False,
        only_pass: int | None = None,
        hooks: _HookCalls | None = None,
        current: Rcpt | None = None,
        view: MessageView | None = None,
    ) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}

        async def ask(slot: FilterSlot, client: UpstreamMilter) -> None:
            started = trio.current_time()
            try:
                outcomes[slot.name] = await call(client)
            except UpstreamFailure as failure:
                outcomes[slot.name] = failure
                self._failed(slot, failure)
            self._count_answer(slot.name, stage, outcomes[slot.name], started)

        async def ask_hook(slot: HookSlot, stages: list[str]) -> None:
            started = trio.current_time()
            outcomes[slot.name] = await self._ask_hook(slot, stages, current, view)
            self._count_answer(slot.name, stage, outcomes[slot.name], started)

        targets = self._targets(message, body, only_pass)
        hooks = hooks or []
        if len(targets) == 1 and not hooks:  # the common case needs no task of its own
            await ask(*targets[0])
            return outcomes
        async with trio.open_nursery() as nursery:
            for slot, client in targets:
                nursery.start_soon(ask, slot, client)
            for hook, stages in hooks:
                nursery.start_soon(ask_hook, hook, stages)
        return outcomes

    async def _body(self, chunk: Body) -> dict[str, Outcome]:
        macro = self._take_macro()
        if self._needs_whole_message():
            in_memory = not self.spool.on_disk
            try:
                self.spool.write(chunk.chunk)
            except SpoolError as exc:
                return await self._spool_failed(exc)
            if in_memory and self.spool.on_disk:
                # Not a refusal: the body goes on, from a temporary file (design §12).
                self._limit_hit("spool_memory", quiet=True, bytes=self.spool.size)
        return await self._fan_out(
            lambda client: client.body(macro, chunk.chunk),
            stage=Stage.BODY,
            message=True,
            body=True,
            only_pass=self.first_pass,
        )

    async def _spool_failed(self, error: SpoolError) -> dict[str, Outcome]:
        """The body cannot be kept (``spoolDirectory`` full, read-only or gone): TEMPFAIL.

        The message is answered TEMPFAIL now, so that the MTA keeps it and retries, rather than
        filtered without the part of its body a hook or a later pass would need; the session
        goes on with the next message. No filter is asked, and no outcome is returned: the MTA
        has its answer, so the caller's ``_answer`` finds nothing left to send.
        """
        log.error("spool_failed", directory=error.directory, error=str(error.error))
        self.metrics.limit_hit("spool_directory")
        self.refusal = StageResult(Tempfail(), Verdict.TEMPFAIL)
        self._ended_early(Stage.BODY, await self._send_if_awaited(self.refusal, Stage.BODY))
        return {}

    def _stage_replies(self, outcomes: dict[str, Outcome]) -> list[tuple[str, StageReply]]:
        """Each filter's final reply at this stage, in configured order (sticky ones included)."""
        replies: list[tuple[str, StageReply]] = []
        stickies: list[tuple[str, Reply | None]] = [
            (slot.name, slot.sticky or (None if slot.left_message else slot.sticky_message))
            for slot in self.slots
            if not slot.observing
        ]
        stickies += [(hook.name, hook.sticky) for hook in self.hooks if not hook.observing]
        for name, sticky in stickies:
            outcome = outcomes.get(name)
            if isinstance(outcome, list) and outcome and isinstance(outcome[-1], STAGE_REPLIES):
                replies.append((name, outcome[-1]))
            elif sticky is not None and isinstance(sticky, STAGE_REPLIES):
                replies.append((name, sticky))
        return replies

    async def _answer(self, stage: Stage, outcomes: dict[str, Outcome]) -> StageResult:
        """Merge the stage's replies and answer the MTA, if it waits for an answer."""
        replies = self._stage_replies(outcomes)
        if replies and all(type(reply) is Continue for _, reply in replies):
            return await self._send_if_awaited(_ALL_CONTINUE, stage)  # the common case, decided
        negotiated = self.milter.connection.negotiated
        skip_allowed = negotiated is not None and negotiated.skip
        hooks_want_body = stage is Stage.BODY and self._needs_whole_message()
        if stage is Stage.BODY and skip_allowed and not replies and not hooks_want_body:
            targets = self._targets(message=True, body=True, only_pass=self.first_pass)
            if not any(client.negotiated.sends(Body) for _, client in targets):
                return await self._send_if_awaited(StageResult(Skip(), Verdict.SKIP), stage)
        answered = {name for name, _ in replies}
        # A hook never ends its part early: while one is usable, the bridge must not answer
        # ACCEPT, which would end the MTA's conversation before the hook's later stages.
        others = any(
            slot.name not in answered and (slot.live() is not None or not slot.joined)
            for slot in self.slots
            if not slot.gone
        ) or any(hook.usable for hook in self.hooks)
        result = merge_stage(
            stage,
            replies,
            others_active=others,
            others_want_body=hooks_want_body
            or (
                stage is Stage.BODY
                and any(
                    not c.skipping_body and c.negotiated.no_reply(Body)
                    for _, c in self._targets(message=True, only_pass=self.first_pass)
                )
            ),
            skip_allowed=skip_allowed,
        )
        return await self._send_if_awaited(result, stage)

    async def _send_if_awaited(self, result: StageResult, stage: Stage) -> StageResult:
        """Answer the MTA unless it negotiated no reply for this step."""
        if self.milter.connection.awaiting is not None:
            await self.milter.send(result.reply)
            if logs.TRACE:
                log.debug("mta_reply", reply=type(result.reply).__name__)
            self.metrics.stage_waited(stage.value, trio.current_time() - self.received_at)
        elif self.refusal is None and stage in _MESSAGE_STAGES and result.verdict in _REFUSALS:
            # The MTA did not wait for this step (no-reply headers or body): the refusal is its
            # answer at the next step it waits for, end-of-message.
            self.refusal = result
        return result

    # --- accounting ---------------------------------------------------------------------

    def _count_answer(self, name: str, stage: Stage, outcome: Outcome, started: float) -> None:
        """One filter's answer to one step, for the metrics and the message's record."""
        seconds = trio.current_time() - started
        if isinstance(outcome, UpstreamFailure):
            verdict = "error"
        elif outcome and isinstance(final := outcome[-1], STAGE_REPLIES):
            quarantined = any(isinstance(edit, Quarantine) for edit in outcome)
            verdict = "quarantine" if quarantined else verdict_of(final, stage).value
        else:
            return  # a step sent without waiting for an answer (no-reply)
        self.metrics.filter_answered(name, stage.value, verdict, seconds)
        if verdict != "error":
            self.breakers.succeeded(name)
        if self.report is not None:
            self.report.answered(name, verdict, seconds)
        if name in self.observers and verdict not in ("continue", "accept", "skip"):
            log.info("observe_verdict", filter=name, stage=stage.value, verdict=verdict)

    def _ended_early(self, stage: Stage, result: StageResult) -> None:
        """A refusal at a message stage before end-of-message ends the message there."""
        if stage in _MESSAGE_STAGES and result.verdict in _REFUSALS:
            self._end_message(result.verdict.value)

    def _end_message(self, verdict: str, edits: Sequence[Reply] = ()) -> None:
        """Log the message's canonical line and count it (``aborted`` ones are not counted)."""
        report, self.report = self.report, None
        if report is None:
            return
        if verdict != "aborted":
            self.metrics.message(verdict)
        mail = self.history.mail[1] if self.history.mail else None
        helo = self.history.helo[1] if self.history.helo else None
        log.info(
            "message_end",
            queue_id=self.macros.get("i"),
            client=self.stats.client,
            helo=helo.name.decode("utf-8", "replace") if isinstance(helo, Helo) else None,
            sender=mail.address.decode("utf-8", "replace") if isinstance(mail, Mail) else None,
            recipients=len(self.history.recipients),
            verdict=verdict,
            **report.fields(),
            duration=round(trio.current_time() - report.started, 6),
        )

    # --- end of message -----------------------------------------------------------------

    async def _end_of_message(self, macro: Macro | None) -> None:
        """Every pass in turn (design §6), then one edit script and one final reply."""
        self.stats.messages += 1
        passes = {slot.config.pass_ for slot in self.slots}
        passes |= {hook.config.pass_ for hook in self.hooks}
        mail = self.history.mail
        view = MessageView(
            MessageState.received(
                self.headers,
                sender=mail[1].address if mail and isinstance(mail[1], Mail) else b"<>",
                recipients=[r.address for _, r in self.history.recipients if isinstance(r, Rcpt)],
            )
        )
        script = PassScript()
        result = _ALL_CONTINUE
        mta_gone: list[trio.BrokenResourceError | trio.ClosedResourceError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_mta_waiting, nursery.cancel_scope, mta_gone)
            for number in sorted(passes) or [self.first_pass]:
                outcomes = await self._run_pass(number, macro, view)
                result = merge_stage(Stage.EOM, self._stage_replies(outcomes))
                if result.reply not in (Continue(), Accept()):
                    break
                edits = self._merged_edits(outcomes, view, number)
                view, script = advance(view, script, edits)
                if script.quarantined:
                    break  # quarantine ends the message like a refusal: later passes wait
            nursery.cancel_scope.cancel()
        if mta_gone:
            raise mta_gone[0]  # outside the nursery: a plain stream error, as at any other step
        accepted = result.reply in (Continue(), Accept())
        packets = script.packets if accepted else []
        await self.milter.send(*packets, result.reply)
        if logs.TRACE:
            log.debug("mta_reply", reply=type(result.reply).__name__, edits=len(packets))
        self.metrics.stage_waited(Stage.EOM.value, trio.current_time() - self.received_at)
        if not accepted:
            verdict = result.verdict.value
        elif script.quarantined:
            verdict = "quarantine"
        else:
            verdict = "accept"  # CONTINUE at end-of-message is acceptance
        self._end_message(verdict)

    async def _run_pass(
        self, number: int, macro: Macro | None, view: MessageView
    ) -> dict[str, Outcome]:
        """One pass at end-of-message: the first gets EOM (it had the rest live), later ones
        the whole message from the view; its hooks get their data call with the view."""
        hooks: _HookCalls = []
        if any(hook.wants_message for hook in self.hooks):
            variables = session_variables(self.history, self.macros)
            hooks = [
                (hook, ["data"])
                for hook in self.hooks
                if hook.config.pass_ == number
                and hook.wants_message
                and hook.config.enable.evaluate(variables)
            ]
        first = number == self.first_pass
        headers = view.headers()

        def call(client: UpstreamMilter) -> Awaitable[list[Reply]]:
            if first:
                return client.command(macro, EndOfMessage())
            chunks = body_chunks(view, self.spool.reader(), self.spool.size)
            return replay_message(client, headers, chunks, self.eoh_macro, macro)

        return await self._fan_out(
            call,
            stage=Stage.EOM,
            message=True,
            only_pass=number,
            hooks=hooks,
            view=None if first else view,
        )

    async def _keep_mta_waiting(
        self,
        end_of_message: trio.CancelScope,
        mta_gone: list[trio.BrokenResourceError | trio.ClosedResourceError],
    ) -> None:
        """PROGRESS every PROGRESS_INTERVAL while the filters think. An MTA that is gone ends
        end-of-message at once; the caller re-raises its error outside the nursery, where the
        session takes it as a lost connection (from the nursery it would be an ExceptionGroup)."""
        try:
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                await self.milter.send(Progress())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            mta_gone.append(exc)
            end_of_message.cancel()

    def _merged_edits(
        self, outcomes: dict[str, Outcome], view: MessageView, number: int
    ) -> list[Reply]:
        """One pass's edits, merged against the view its filters saw."""
        per_filter: list[tuple[str, list[Reply]]] = []
        for slot in self.slots:
            if slot.config.pass_ != number:
                continue
            outcome = outcomes.get(slot.name)
            edits = list(outcome[:-1]) if isinstance(outcome, list) else []
            edits += [DelRcpt(address) for address in slot.refused_recipients]
            edits = [e for e in edits if not isinstance(e, Progress)]
            if edits:
                per_filter.append((slot.name, edits))
        for hook in self.hooks:
            # A hook that failed in this message contributes nothing: never half its edits.
            if hook.config.pass_ == number and hook.usable and hook.pending:
                per_filter.append((hook.name, list(hook.pending)))
        for name, edits in per_filter:
            if name in self.observers:
                counts = edit_counts(edits)
                log.info("observe_edits", filter=name, edits=dict(counts))
                for kind, number in counts.items():
                    self.metrics.edits(name, kind, number)
        per_filter = [item for item in per_filter if item[0] not in self.observers]
        if not per_filter:
            return []
        merged = merge_edits(view.state, per_filter)
        for name, edits in per_filter:
            counts = edit_counts(edits)
            for kind, number in counts.items():
                self.metrics.edits(name, kind, number)
            if self.report is not None:
                self.report.edits.update(counts)
        for conflict in merged.conflicts:
            self.metrics.merge_conflict(conflict.kind.value)
            log.info(
                "merge_conflict",
                kind=conflict.kind.value,
                filters=list(conflict.filters),
                winner=conflict.filters[-1],
                header=conflict.subject.decode("ascii", "replace") or None,
            )
        return list(merged.script)

    # --- abort and close ----------------------------------------------------------------

    async def _abort(self) -> None:
        async def abort(slot: FilterSlot, client: UpstreamMilter) -> None:
            try:
                await client.abort()
            except UpstreamFailure as failure:
                self._failed(slot, failure)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                client = slot.live()
                if client is not None:
                    nursery.start_soon(abort, slot, client)
        self._new_message()

    async def _close_upstreams(self) -> None:
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                if slot.client is not None:
                    nursery.start_soon(slot.client.quit)
                    slot.client = None

    def _log_end(self) -> None:
        stats = self.stats
        log.info(
            "session_end",
            client=stats.client,
            messages=stats.messages,
            aborts=stats.aborts,
            commands=stats.commands,
            outcome=stats.outcome,
            error=stats.error,
            duration=round(trio.current_time() - stats.started, 6),
        )


#: Failures that are a protocol violation by the filter (``protocol_errors_total{peer="filter"}``).
_PROTOCOL_FAILURES = frozenset(
    {FailureKind.GARBAGE, FailureKind.OVERSIZE, FailureKind.PROTOCOL, FailureKind.NEGOTIATION}
)
#: Failures that say the filter cannot be reached (``filter_up`` 0).
_UNREACHABLE = frozenset({FailureKind.REFUSED, FailureKind.CONNECT_TIMEOUT, FailureKind.TLS})
#: Stages at which a refusal ends the message (RCPT refuses one recipient, CONNECT/HELO no
#: message has begun).
_MESSAGE_STAGES = frozenset({Stage.MAIL, Stage.DATA, Stage.HEADER, Stage.EOH, Stage.BODY})
_REFUSALS = frozenset({Verdict.REJECT, Verdict.TEMPFAIL, Verdict.DISCARD, Verdict.SHUTDOWN})


#: What a limit answers (design §12): permanent for a header flood, one recipient at a time for
#: a recipient flood (RFC 5321 §4.5.3.1.10: the client sends the rest later).
TOO_MANY_HEADERS = ReplyCode(b"552 5.3.4 Too many header fields")
TOO_MANY_RECIPIENTS = ReplyCode(b"452 4.5.3 Too many recipients")


#: A later-pass milter as the MTA negotiation counts it: no reply owed at the message steps.
_SILENT_MESSAGE = MilterProtocol.NR_HDR | MilterProtocol.NR_EOH | MilterProtocol.NR_BODY


def _macro_name(name: bytes) -> str:
    """``{auth_authen}`` and ``auth_authen`` name the same macro."""
    return name.decode("ascii", "replace").removeprefix("{").removesuffix("}")


def _in_message(command: Command) -> bool:
    return not isinstance(command, Connect | Helo | Mail | Unknown)
