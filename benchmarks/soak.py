#!/usr/bin/env python3
"""Soak test (issue #10 item 3): mail keeps flowing through the bridge while filters crash.

Run from the repository root, as root (a private Postfix needs it), or through soak.sh::

    PYTHONPATH=. python benchmarks/soak.py [--messages 100000] [--concurrency 20]
        [--kill-every 5] [--sample-every 5] [--edits 3] [--edit-gap-ms 2] [--size 2048]
        [--policies true,true,false] [--seed S] [--max-rss-growth-mb 10] [--keep]

What runs: ``smtp-source`` -> a private Postfix (``milter_default_action = tempfail``) ->
``milterbridge run`` -> three C filters (benchmarks/c_filter), each adding ``--edits``
headers ``X-Soak-fI-1`` .. ``X-Soak-fI-N`` at end-of-message with ``--edit-gap-ms`` between
two of them, so that a kill can land between two edits of one message. Postfix delivers to
smtp-sink, which keeps every message as a file. The filters' ``tempFailOnError`` comes from
``--policies`` (default: true for f1 and f2, false for f3), so both policies are exercised.

While smtp-source sends, one thread kills a random filter with SIGKILL every ``--kill-every``
seconds (each wait drawn between half and one and a half times that) and restarts it at once
on the same port; another samples the bridge's RSS (/proc/PID/status VmRSS) and open file
descriptors (/proc/PID/fd) every ``--sample-every`` seconds.

Afterwards, once Postfix's queue is empty, every message must be accounted for:

* smtp-source: every refusal is a 4xx (a tempfail); accepted + refused = ``--messages``,
  "accepted" being the messages Postfix queued (its ``(queue active)`` lines);
* Postfix: as many tempfails logged as smtp-source saw, every accepted message ``status=sent``
  once, nothing deferred, bounced or left in the queue;
* smtp-sink: exactly the messages Postfix sent (matched by queue id), none twice;
* each delivered message carries all or none of each filter's edits (the offenders are listed
  with the bridge's ``message_end`` line for them), and as many ``X-Soak`` headers as the
  bridge's ``message_end`` says it added;
* the bridge is still running, logged no ``session_crashed``, its RSS grew by at most
  ``--max-rss-growth-mb`` between the second and the last tenth of the run (medians of the
  samples), and it holds no more file descriptors once idle than before the run.

A markdown table goes to stdout (and ``table.md`` in the work directory), progress to stderr;
the exit status is 1 if any check failed. The work directory (Postfix's maillog, the bridge's
JSON log, smtp-sink's files, the samples as CSV, kills.log with each kill and the messages it
caught mid-way, the filters' logs) is kept when a check failed or with --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import CFilter, build_c_filter, free_port, rss_kib  # noqa: E402
from tests.integration.bridge_process import BridgeProcess  # noqa: E402
from tests.integration.postfix_harness import PostfixInstance, parse_sink_file  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "soak@sender.test"
RECIPIENT = "rcpt@rcpt.test"
#: Long queue ids: the short ones (microseconds and inode) come back within 100,000 messages --
#: the first full run saw two ids used twice -- and the accounting matches messages by id.
MAIN_CF = {
    "milter_default_action": "tempfail",
    "milter_protocol": "6",
    "enable_long_queue_ids": "yes",
}
HEADER_PREFIX = "X-Soak-"

#: smtp-source's line for a refused message: "smtp-source: warning: end of data rejected: 451 ..."
_REFUSED_RE = re.compile(r"warning: (?P<stage>.+?) rejected: (?P<code>\d{3})\b")
#: Postfix's id of the message, in the Received header it adds ("... with ESMTP id 4Xy2Z...").
_RECEIVED_ID_RE = re.compile(r"\bwith E?SMTP id ([0-9A-Za-z]+)")
_QUEUED_RE = re.compile(r" ([0-9A-Za-z]{6,}): from=<[^>]*>, size=\d+, nrcpt=\d+ \(queue active\)")
_SENT_RE = re.compile(r" ([0-9A-Za-z]{6,}): to=<[^>]*>.* status=sent ")
_STATUS_RE = re.compile(r" status=(deferred|bounced|expired)\b")
#: A refusal Postfix logged: a milter's (milter-reject) or its own (reject), with its code.
_POSTFIX_REFUSAL_RE = re.compile(r"(?:milter-reject|: reject): .*?: (?:\d{3} )?([45])\.\d+\.\d+ ")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The filters and the killer
# --------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One filter of the bridge: the process, its error policy, what happened to it."""

    filter: CFilter
    temp_fail_on_error: bool
    kills: int = 0
    restart_failures: list[str] = field(default_factory=list)
    #: Where the running incarnation's lines start in the filter's stderr log.
    log_offset: int = 0
    #: Messages a kill left unanswered at end-of-message, by how many edits were sent.
    interrupted: Counter[int] = field(default_factory=Counter)

    def start(self) -> None:
        self.log_offset = _size(self.filter.log_path)
        self.filter.start()

    def kill(self) -> Counter[int]:
        """SIGKILL, then read from its log which messages it left mid-way (--log-edits): how
        many, by the number of edits sent."""
        self.filter.kill()
        self.kills += 1
        with self.filter.log_path.open("rb") as log:
            log.seek(self.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        sent: Counter[str] = Counter()
        replied: set[str] = set()
        for line in lines:
            words = line.split()
            if len(words) >= 3 and words[0] == "eom":
                if words[2] == "edit":
                    sent[words[1]] += 1
                elif words[2] == "replied":
                    replied.add(words[1])
        left: Counter[int] = Counter(n for eom, n in sent.items() if eom not in replied)
        self.interrupted.update(left)
        return left

    @property
    def name(self) -> str:
        return self.filter.name

    @property
    def header(self) -> str:
        return f"{HEADER_PREFIX}{self.name}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def start_members(
    binary: Path, workdir: Path, policies: list[bool], edits: int, gap_ms: int
) -> list[Member]:
    """The filters f1..fN, each on a port of its own that it keeps across restarts."""
    members = []
    for index, policy in enumerate(policies, 1):
        name = f"f{index}"
        f = CFilter(
            binary,
            workdir / name,
            name=name,
            header=(f"{HEADER_PREFIX}{name}", "1"),
            edits=edits,
            edit_gap_ms=gap_ms,
            port=free_port(),
            log_edits=True,
        )
        member = Member(f, policy)
        member.start()
        members.append(member)
    return members


def bridge_config(members: list[Member]) -> str:
    """Every filter joins at DATA; only the error policy differs."""
    lines: list[str] = []
    for m in members:
        lines += [
            "[[milter]]",
            f'name = "{m.name}"',
            f'hostname = "{m.filter.host}"',
            f"port = {m.filter.port}",
            'stages = ["data"]',
            f"tempFailOnError = {'true' if m.temp_fail_on_error else 'false'}",
            "",
        ]
    return "\n".join(lines)


class Killer(threading.Thread):
    """SIGKILLs a random filter every few seconds and restarts it on its port at once."""

    def __init__(self, members: list[Member], every: float, seed: int, log_path: Path) -> None:
        super().__init__(name="killer", daemon=True)
        self.members = members
        self.log_path = log_path
        self.every = every
        self.random = random.Random(seed)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every * self.random.uniform(0.5, 1.5)):
            self.kill_one(self.random.choice(self.members))

    def kill_one(self, member: Member) -> None:
        """Kill, note it (UTC time, filter, messages left by edits sent), restart."""
        left = member.kill()
        now = time.time()
        stamp = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z"
        )
        with self.log_path.open("a") as log:
            log.write(f"{stamp} kill {member.name} ")
            log.write(f"left-with-edits-sent {dict(sorted(left.items()))}\n")
        for attempt in range(1, 6):
            try:
                member.start()
                return
            except RuntimeError as exc:
                member.restart_failures.append(f"attempt {attempt}: {exc}")
                time.sleep(0.2)
        progress(f"{member.name} did not come back: {member.restart_failures[-1]}")

    def stop(self) -> None:
        self.stopping.set()
        self.join()


# --------------------------------------------------------------------------------------------
# The bridge's RSS and file descriptors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the load started (negative: before)
    rss_kib: int
    fds: int
    delivered: int


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """Reads the bridge's VmRSS and fd count (and the sink's count) every few seconds."""

    def __init__(self, pid: int, sink_dir: Path, every: float, t0: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.sink_dir = sink_dir
        self.every = every
        self.t0 = t0
        self.samples: list[Sample] = []
        self.stopping = threading.Event()

    def take(self) -> Sample:
        sample = Sample(
            time.monotonic() - self.t0,
            rss_kib(self.pid),
            open_fds(self.pid),
            sum(1 for _ in os.scandir(self.sink_dir)),
        )
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.take()
            except (FileNotFoundError, ProcessLookupError):
                return  # the bridge died: the checks say so

    def stop(self) -> None:
        self.stopping.set()
        self.join()


# --------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------


def smtp_source_argv(pf: PostfixInstance, messages: int, concurrency: int, size: int) -> list[str]:
    """One SMTP connection per message (no -d); -A: go on after a refusal."""
    argv = [SMTP_SOURCE, "-A", "-s", str(concurrency), "-m", str(messages), "-l", str(size)]
    argv += ["-M", "client.test", "-f", SENDER, "-t", RECIPIENT, f"{pf.host}:{pf.smtp_port}"]
    return argv


def run_load(
    argv: list[str], out_path: Path, sampler: Sampler, members: list[Member], messages: int
) -> int:
    """Run smtp-source to its end, printing progress every 30 s; its exit status."""
    with out_path.open("wb") as out:
        source = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        next_report = time.monotonic() + 30
        while source.poll() is None:
            time.sleep(0.5)
            if time.monotonic() >= next_report and sampler.samples:
                next_report += 30
                s = sampler.samples[-1]
                kills = ", ".join(f"{m.name} {m.kills}" for m in members)
                progress(
                    f"{s.seconds:.0f}s: {s.delivered}/{messages} at the sink, kills {kills}, "
                    f"bridge RSS {s.rss_kib / 1024:.1f} MB, fds {s.fds}, "
                    f"load avg {os.getloadavg()[0]:.1f}"
                )
    return source.returncode


def wait_drained(pf: PostfixInstance, timeout: float) -> None:
    """Until Postfix has nothing in maildrop/incoming/active (deferred mail would stay)."""
    pf.wait_queue_idle(timeout=timeout)


def wait_fds_at_most(pid: int, limit: int, timeout: float) -> int:
    """The bridge's fd count once it is at most ``limit`` (sessions closing), or at timeout."""
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) > limit and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


@dataclass
class SourceReport:
    """What smtp-source said: refusals by class and stage, anything else verbatim."""

    tempfailed: int = 0
    hard_refused: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    other: list[str] = field(default_factory=list)


def read_smtp_source(path: Path) -> SourceReport:
    report = SourceReport()
    for line in path.read_text(errors="replace").splitlines():
        match = _REFUSED_RE.search(line)
        if match is None:
            if line.strip():
                report.other.append(line)
            continue
        if match["code"].startswith("4"):
            report.tempfailed += 1
            report.by_stage[match["stage"]] += 1
        else:
            report.hard_refused += 1
            report.other.append(line)
    return report


@dataclass
class MaillogReport:
    queued: set[str] = field(default_factory=set)
    sent: Counter[str] = field(default_factory=Counter)
    tempfail_lines: int = 0
    hard_reject_lines: int = 0
    bad_status: Counter[str] = field(default_factory=Counter)
    milter_warnings: int = 0
    samples: list[str] = field(default_factory=list)


def read_maillog(path: Path) -> MaillogReport:
    report = MaillogReport()
    with path.open(errors="replace") as log:
        for line in log:
            if (m := _QUEUED_RE.search(line)) is not None:
                report.queued.add(m[1])
            elif (m := _SENT_RE.search(line)) is not None:
                report.sent[m[1]] += 1
            elif (m := _POSTFIX_REFUSAL_RE.search(line)) is not None:
                if m[1] == "4":
                    report.tempfail_lines += 1
                else:
                    report.hard_reject_lines += 1
                    report.samples.append(line.strip())
            elif (m := _STATUS_RE.search(line)) is not None:
                report.bad_status[m[1]] += 1
                report.samples.append(line.strip())
            elif "warning: milter " in line:
                report.milter_warnings += 1
                if len(report.samples) < 20:
                    report.samples.append(line.strip())
    return report


@dataclass
class Delivered:
    """One message at the sink: Postfix's queue id and, per filter, its edit headers seen."""

    queue_id: str | None
    path: Path
    edits: dict[str, list[str]]  # filter name -> the X-Soak-fI-k header names it carries


def read_sink(sink_dir: Path, members: list[Member]) -> Iterator[Delivered]:
    prefixes = {m.name: f"{m.header}".lower() for m in members}
    for entry in sorted(os.scandir(sink_dir), key=lambda e: e.name):
        path = Path(entry.path)
        message = parse_sink_file(path.read_bytes(), path)
        received = message.header("Received") or ""
        match = _RECEIVED_ID_RE.search(received)
        edits: dict[str, list[str]] = {name: [] for name in prefixes}
        for header_name in message.header_names:
            lower = header_name.lower()
            for name, prefix in prefixes.items():
                if lower == prefix or lower.startswith(prefix + "-"):
                    edits[name].append(header_name)
        yield Delivered(match[1] if match else None, path, edits)


@dataclass
class BridgeReport:
    """The bridge's log, reduced: message_end by queue id, errors and events counted."""

    message_end: dict[str, dict[str, Any]] = field(default_factory=dict)
    filter_errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: Sessions that did not try a filter because its circuit was open, per filter.
    skipped: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    session_outcomes: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


#: Lines a soak run expects from the bridge; anything else at warning or above is listed.
_EXPECTED_WARNINGS = {"filter_error", "circuit_opened", "probe_failed"}


def read_bridge_log(path: Path) -> BridgeReport:
    report = BridgeReport()
    with path.open("rb") as log:
        for raw in log:
            try:
                line = json.loads(raw)
            except ValueError:
                report.unexpected.append(raw.decode(errors="replace").strip()[:300])
                continue
            event = line.get("event", "?")
            report.events[event] += 1
            if event == "message_end":
                report.verdicts[str(line.get("verdict"))] += 1
                if line.get("queue_id"):
                    report.message_end[line["queue_id"]] = line
            elif event == "filter_error":
                key = (str(line.get("filter")), str(line.get("stage")), str(line.get("kind")))
                report.filter_errors[key] += 1
            elif event == "filter_skipped":
                report.skipped[str(line.get("filter"))] += 1
            elif event == "session_end":
                report.session_outcomes[str(line.get("outcome"))] += 1
            elif event == "session_crashed":
                report.crashes.append(json.dumps(line)[:2000])
            if line.get("level") in ("warning", "error", "critical") and (
                event not in _EXPECTED_WARNINGS and event != "session_crashed"
            ):
                report.unexpected.append(json.dumps(line)[:300])
    return report


@dataclass
class EditTally:
    """Per filter, how the delivered messages carry its edits."""

    full: Counter[str] = field(default_factory=Counter)
    none: Counter[str] = field(default_factory=Counter)
    half: list[str] = field(default_factory=list)  # one line per offender, with evidence
    count_mismatch: list[str] = field(default_factory=list)


def tally_edits(
    delivered: list[Delivered], members: list[Member], edits: int, bridge: BridgeReport
) -> EditTally:
    tally = EditTally()
    for message in delivered:
        total = 0
        for m in members:
            seen = message.edits[m.name]
            total += len(seen)
            expected = [f"{m.header}-{i}" for i in range(1, edits + 1)] if edits > 1 else [m.header]
            if not seen:
                tally.none[m.name] += 1
            elif sorted(seen) == sorted(expected):
                tally.full[m.name] += 1
            else:
                end = bridge.message_end.get(message.queue_id or "")
                tally.half.append(
                    f"{message.queue_id} ({message.path.name}): {m.name} edits {seen} of "
                    f"{len(expected)}; bridge message_end: {json.dumps(end)[:600]}"
                )
        end = bridge.message_end.get(message.queue_id or "")
        added = (end or {}).get("edits", {}).get("add_header", 0)
        if end is not None and added != total:
            tally.count_mismatch.append(
                f"{message.queue_id}: {total} {HEADER_PREFIX}* headers, bridge says add_header "
                f"{added}: {json.dumps(end)[:400]}"
            )
    return tally


# --------------------------------------------------------------------------------------------
# Checks and the table
# --------------------------------------------------------------------------------------------


@dataclass
class Resources:
    idle_before: Sample
    idle_after: Sample
    during: list[Sample]

    def tenth(self, k: int) -> list[Sample]:
        """The samples of the k-th tenth of the load (0-based)."""
        end = self.during[-1].seconds if self.during else 0.0
        return [s for s in self.during if k * end / 10 <= s.seconds <= (k + 1) * end / 10]

    def rss_median_mb(self, k: int) -> float | None:
        samples = self.tenth(k)
        return statistics.median(s.rss_kib for s in samples) / 1024 if samples else None

    def rss_growth_mb(self) -> float | None:
        """Median RSS of the last tenth minus that of the second: the leak, if any; None when
        the run was too short to have samples in both."""
        first, last = self.rss_median_mb(1), self.rss_median_mb(9)
        return None if first is None or last is None else last - first


def check(
    args: argparse.Namespace,
    source: SourceReport,
    source_status: int,
    maillog: MaillogReport,
    queue_left: int,
    delivered: list[Delivered],
    tally: EditTally,
    bridge: BridgeReport,
    bridge_alive: bool,
    resources: Resources,
    members: list[Member],
) -> list[str]:
    """Every way the run can have lost, duplicated or half-edited mail, or leaked."""
    n = args.messages
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    accepted = len(maillog.queued)
    expect(source_status == 0, f"smtp-source exited with status {source_status}")
    expect(not source.other, f"smtp-source said other things: {source.other[:5]}")
    expect(
        accepted + source.tempfailed == n,
        f"accepted {accepted} + tempfailed {source.tempfailed} != {n} sent "
        f"({n - accepted - source.tempfailed} unaccounted for)",
    )
    expect(
        maillog.tempfail_lines == source.tempfailed,
        f"Postfix logged {maillog.tempfail_lines} tempfails, smtp-source saw {source.tempfailed}",
    )
    expect(maillog.hard_reject_lines == 0, f"{maillog.hard_reject_lines} 5xx refusals logged")
    sent_ids = set(maillog.sent)
    expect(sent_ids == maillog.queued, _set_difference("queued", maillog.queued, "sent", sent_ids))
    twice = [qid for qid, k in maillog.sent.items() if k > 1]
    expect(not twice, f"Postfix sent {len(twice)} messages more than once: {twice[:10]}")
    expect(not maillog.bad_status, f"Postfix delivery problems: {dict(maillog.bad_status)}")
    expect(queue_left == 0, f"{queue_left} messages left in Postfix's queue")
    sink_ids = Counter(d.queue_id for d in delivered)
    expect(None not in sink_ids, f"{sink_ids[None]} sink files without Postfix's queue id")
    expect(
        set(sink_ids) == sent_ids,
        _set_difference("sent", sent_ids, "at the sink", {q for q in sink_ids if q}),
    )
    dup = [qid for qid, k in sink_ids.items() if k > 1]
    expect(not dup, f"{len(dup)} messages at the sink more than once: {dup[:10]}")
    expect(
        not tally.half,
        f"{len(tally.half)} half-edited messages:\n  " + "\n  ".join(tally.half[:50]),
    )
    expect(
        not tally.count_mismatch,
        f"{len(tally.count_mismatch)} messages whose edits differ from the bridge's "
        "message_end:\n  " + "\n  ".join(tally.count_mismatch[:20]),
    )
    expect(bridge_alive, "the bridge process died")
    expect(not bridge.crashes, f"{len(bridge.crashes)} session_crashed: {bridge.crashes[:3]}")
    expect(not bridge.unexpected, f"bridge: unexpected lines: {bridge.unexpected[:5]}")
    growth = resources.rss_growth_mb()
    if growth is None:
        progress("too few RSS samples to tell growth (a short run: lower --sample-every)")
    expect(
        growth is None or growth <= args.max_rss_growth_mb,
        f"bridge RSS grew by {growth if growth is None else round(growth, 1)} MB between the "
        f"second and the last tenth of the run (limit {args.max_rss_growth_mb} MB)",
    )
    expect(
        resources.idle_after.fds <= resources.idle_before.fds,
        f"bridge holds {resources.idle_after.fds} fds idle after the run, "
        f"{resources.idle_before.fds} before",
    )
    for m in members:
        expect(m.filter.proc is not None, f"{m.name} is not running at the end")
    return problems


def _set_difference(a_name: str, a: set[str], b_name: str, b: set[str]) -> str:
    only_a, only_b = sorted(a - b), sorted(b - a)
    return (
        f"{len(only_a)} {a_name} but not {b_name} (e.g. {only_a[:10]}); "
        f"{len(only_b)} {b_name} but not {a_name} (e.g. {only_b[:10]})"
    )


def _mb(kib: float) -> str:
    return f"{kib / 1024:.1f} MB"


def table(
    args: argparse.Namespace,
    members: list[Member],
    source: SourceReport,
    delivered: int,
    tally: EditTally,
    bridge: BridgeReport,
    resources: Resources,
    seconds: float,
    problems: list[str],
    maillog_warnings: int,
) -> str:
    n = args.messages
    during = resources.during or [resources.idle_before]
    peak_rss = max(s.rss_kib for s in during)
    peak_fds = max(s.fds for s in during)
    curve = [resources.rss_median_mb(k) for k in range(10)]
    stages = ", ".join(f"{stage} {k}" for stage, k in source.by_stage.most_common())
    rows: list[tuple[str, str]] = [
        (
            "messages sent (smtp-source)",
            f"{n:,}, {args.concurrency} sessions, {args.size}-byte bodies, one per connection",
        ),
        ("delivered (at smtp-sink, matched to Postfix's status=sent)", f"{delivered:,}"),
        ("tempfailed (4xx to smtp-source, logged by Postfix)", f"{source.tempfailed:,} ({stages})"),
        ("lost, duplicated or refused 5xx", f"{n - delivered - source.tempfailed:,}"),
    ]
    for m in members:
        errors = ", ".join(
            f"{stage}/{kind} {k}"
            for (name, stage, kind), k in sorted(bridge.filter_errors.items())
            if name == m.name
        )
        rows.append(
            (
                f"{m.name} (tempFailOnError {str(m.temp_fail_on_error).lower()}): kills; "
                "filter_error stage/kind; sessions that skipped it (circuit open)",
                f"{m.kills}; {errors or 'none'}; {bridge.skipped[m.name]:,}",
            )
        )
    for m in members:
        mid = sum(k for sent, k in m.interrupted.items() if 0 < sent < args.edits)
        rows.append(
            (
                f"{m.name}: messages a kill left between two edits / after all edits, "
                "before the reply",
                f"{mid} / {m.interrupted[args.edits]}",
            )
        )
    for m in members:
        rows.append(
            (
                f"delivered with {m.name}'s {args.edits} edits: all / none",
                f"{tally.full[m.name]:,} / {tally.none[m.name]:,}",
            )
        )
    rows += [
        ("half-edited (must be 0)", f"{len(tally.half)}"),
        ("circuit_opened lines", f"{bridge.events['circuit_opened']}"),
        ("Postfix 'warning: milter' lines", f"{maillog_warnings}"),
        (
            "bridge session_end outcomes",
            ", ".join(f"{k} {v:,}" for k, v in bridge.session_outcomes.most_common()),
        ),
        (
            "bridge RSS start / peak / end",
            f"{_mb(resources.idle_before.rss_kib)} idle / {_mb(peak_rss)} / "
            f"{_mb(resources.idle_after.rss_kib)} idle",
        ),
        (
            "bridge RSS, median of each tenth of the run",
            " ".join(f"{v:.1f}" if v is not None else "-" for v in curve) + " MB",
        ),
        (
            "bridge open fds start / peak / end",
            f"{resources.idle_before.fds} idle / {peak_fds} / {resources.idle_after.fds} idle",
        ),
        (
            "duration (smtp-source start to queue empty)",
            f"{seconds:.0f} s ({seconds / 60:.1f} min)",
        ),
        ("messages/s (sent / duration)", f"{n / seconds:.1f}"),
        ("checks", "all passed" if not problems else f"{len(problems)} FAILED (see stderr)"),
    ]
    out = ["| measure | value |", "|---|---|"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--size", type=int, default=2048, help="body bytes (smtp-source -l)")
    parser.add_argument(
        "--kill-every", type=float, default=5.0, help="mean seconds between two kills"
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds (RSS, fds)")
    parser.add_argument("--edits", type=int, default=3, help="headers per filter and message")
    parser.add_argument(
        "--edit-gap-ms", type=int, default=2, help="sleep between two edits of one filter"
    )
    parser.add_argument(
        "--policies",
        default="true,true,false",
        help="tempFailOnError of each filter, comma-separated (their count = filters)",
    )
    parser.add_argument("--seed", type=int, default=None, help="of the killer (printed)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=10.0)
    parser.add_argument(
        "--drain-timeout", type=float, default=600.0, help="for Postfix's queue at the end"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    try:
        args.policy_list = [
            {"true": True, "false": False}[p.strip()] for p in args.policies.split(",")
        ]
    except KeyError:
        parser.error("--policies: a comma-separated list of true and false")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0 or not os.access(SMTP_SOURCE, os.X_OK):
        print("needs root and Postfix's smtp-source/smtp-sink", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mb-soak-"))
    workdir.chmod(0o755)  # the postfix user must traverse it
    progress(
        f"work directory {workdir}; seed {args.seed}; nproc {os.cpu_count()}; "
        f"load avg {os.getloadavg()}"
    )
    binary = build_c_filter(workdir / "build")
    with ExitStack() as stack:
        members = start_members(binary, workdir, args.policy_list, args.edits, args.edit_gap_ms)
        for m in members:
            stack.callback(m.filter.stop)
        config = workdir / "milterbridge.toml"
        config.write_text(bridge_config(members))
        bridge = stack.enter_context(
            BridgeProcess(workdir / "bridge", args=["--config", str(config), "--log-level", "info"])
        )
        pf = stack.enter_context(PostfixInstance(workdir, milters=[bridge.listen], main_cf=MAIN_CF))
        progress(
            f"smtpd 127.0.0.1:{pf.smtp_port} -> bridge {bridge.listen} (pid {bridge.pid}) -> "
            + ", ".join(
                f"{m.name} {m.filter.spec} tempFailOnError={str(m.temp_fail_on_error).lower()}"
                for m in members
            )
        )
        time.sleep(2.0)  # the bridge's start-up probes are done; its fds settle
        t0 = time.monotonic()
        sampler = Sampler(bridge.pid, pf.sink_dir, args.sample_every, t0)
        idle_before = sampler.take()
        sampler.samples.clear()
        killer = Killer(members, args.kill_every, args.seed, workdir / "kills.log")
        argv = smtp_source_argv(pf, args.messages, args.concurrency, args.size)
        progress(f"sending: {' '.join(argv)}; a kill every ~{args.kill_every:g} s")
        sampler.start()
        killer.start()
        t0 = time.monotonic()
        status = run_load(argv, workdir / "smtp-source.out", sampler, members, args.messages)
        killer.stop()
        progress(f"smtp-source done (exit {status}); waiting for Postfix's queue to empty")
        wait_drained(pf, args.drain_timeout)
        seconds = time.monotonic() - t0
        sampler.stop()
        bridge_alive = bridge.proc is not None and bridge.proc.poll() is None
        idle_after = idle_before
        if bridge_alive:
            wait_fds_at_most(bridge.pid, idle_before.fds, 30.0)
            idle_after = Sample(seconds, rss_kib(bridge.pid), open_fds(bridge.pid), 0)
        queue_left = len(pf.queue())
        time.sleep(0.5)  # postlogd writes asynchronously
        progress("accounting")
        source = read_smtp_source(workdir / "smtp-source.out")
        maillog = read_maillog(pf.maillog_path)
        bridge_report = read_bridge_log(bridge.log_path)
        delivered = list(read_sink(pf.sink_dir, members))
        tally = tally_edits(delivered, members, args.edits, bridge_report)
        resources = Resources(idle_before, idle_after, sampler.samples)
        (workdir / "samples.csv").write_text(
            "seconds,rss_kib,fds,delivered\n"
            + "".join(
                f"{s.seconds:.1f},{s.rss_kib},{s.fds},{s.delivered}\n" for s in sampler.samples
            )
        )
        problems = check(
            args,
            source,
            status,
            maillog,
            queue_left,
            delivered,
            tally,
            bridge_report,
            bridge_alive,
            resources,
            members,
        )
        text = table(
            args,
            members,
            source,
            len(delivered),
            tally,
            bridge_report,
            resources,
            seconds,
            problems,
            maillog.milter_warnings,
        )
        (workdir / "table.md").write_text(text + "\n")
        print(text)
        sys.stdout.flush()
        for problem in problems:
            progress(f"CHECK FAILED: {problem}")
        progress("stopping processes")
    if args.keep or problems:
        progress(
            f"kept {workdir}: postfix/maillog, bridge/bridge.log, postfix/sink/, "
            "smtp-source.out, samples.csv, kills.log, f*/"
        )
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
