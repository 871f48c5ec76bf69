"""Keeping the running service's memory out of core dumps and out of other processes' reach.

The service holds secrets in memory for as long as it runs: the hooks' ``httpAuth`` credentials
(in the request headers it has prepared), the admin tokens (as digests, but a digest of a weak
token is as good as the token to whoever can try words against it) and the ``Value`` secrets of
the API's state file. A core dump writes that memory to disk -- wherever ``core_pattern`` sends
it: a ``core`` file in the working directory, systemd-coredump's store, apport's -- where it
outlives the process and is read by whoever reads those. So ``milterbridge run`` turns core
dumps off for itself, before it reads its configuration:

* **RLIMIT_CORE 0**, soft and hard (the hard limit so that nothing later in the process can
  raise it again): the kernel writes no core file. A ``core_pattern`` that pipes the dump to
  a program is not bound by the limit, only told it (systemd-coredump then stores nothing).
* **PR_SET_DUMPABLE 0** (prctl): the kernel makes no core dump at all, whatever
  ``core_pattern`` says; and other processes of the service's user can no longer attach to it
  (ptrace: gdb, py-spy) without CAP_SYS_PTRACE. Root still can, and ``/proc/PID/status``,
  ``stat`` and ``limits`` stay readable, so monitoring that reads them keeps working. The flag
  shows from outside only as ``/proc/PID/*`` owned by root when the service runs as another
  user (``/proc/PID/status`` has no line for it), so the service logs what the kernel reports
  back.

Both are per process: each worker of ``--workers`` sets them again for itself (the dumpable
flag does not survive ``exec``). ``run --allow-core-dumps`` leaves both alone, for debugging a
crash or profiling the service with py-spy as an ordinary user.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Callable
from typing import Final

import structlog

log = structlog.get_logger("milterbridge")

#: prctl options (linux/prctl.h).
PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4


def apply_core_dump_policy(*, allow: bool) -> None:
    """What ``run`` does first: core dumps off, unless ``allow`` (``--allow-core-dumps``).

    Logged either way, with what the kernel reports back: ``core_dumps_disabled`` at debug
    level, ``core_dumps_allowed`` at info (someone chose to let secrets reach core files), and a
    ``core_dumps_not_disabled`` warning for each setting that did not take.
    """
    if allow:
        log.info("core_dumps_allowed", dumpable=is_dumpable(), core_limit=core_limit())
        return
    for problem in disable_core_dumps():
        log.warning("core_dumps_not_disabled", problem=problem)
    log.debug("core_dumps_disabled", dumpable=is_dumpable(), core_limit=core_limit())


def core_limit() -> list[int]:
    """This process's RLIMIT_CORE as [soft, hard] (-1: unlimited)."""
    return list(resource.getrlimit(resource.RLIMIT_CORE))


def disable_core_dumps() -> list[str]:
    """Set RLIMIT_CORE to 0 and make the process non-dumpable.

    Returns:
        What could not be done, one line each (empty when both settings took); the caller
        logs them and runs on, as it would have before this existed.
    """
    problems: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        problems.append(f"cannot set RLIMIT_CORE to 0: {exc}")
    error = _prctl(PR_SET_DUMPABLE, 0)
    if error is not None:
        problems.append(f"cannot make the process non-dumpable (PR_SET_DUMPABLE): {error}")
    return problems


def is_dumpable() -> bool | None:
    """Whether this process may be dumped (PR_GET_DUMPABLE); None where prctl is missing."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def _prctl(option: int, value: int) -> str | None:
    """Call prctl(option, value); None when it worked, else why it did not."""
    prctl = _libc_prctl()
    if prctl is None:
        return "prctl is not available on this system"
    if prctl(option, value, 0, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _libc_prctl() -> Callable[..., int] | None:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    function: Callable[..., int] = prctl
    return function


__all__ = [
    "PR_GET_DUMPABLE",
    "PR_SET_DUMPABLE",
    "apply_core_dump_policy",
    "core_limit",
    "disable_core_dumps",
    "is_dumpable",
]
