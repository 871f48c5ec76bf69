"""The variables an ``enable`` expression sees, built from what the MTA told the session so far.

Names and sources follow design §9: the CONNECT/HELO/MAIL/RCPT commands and Postfix's macros.
A variable the session does not know yet is simply absent (the evaluator reads it as empty), so
an expression evaluated at CONNECT sees no sender. Values are text: bytes are decoded as UTF-8
with replacement, which is enough to compare and match them.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..milter import Connect, Helo, Mail, Rcpt
from .filters import History

Variables = dict[str, str | list[str]]


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _address(data: bytes) -> str:
    return _text(data).strip().removeprefix("<").removesuffix(">")


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def session_variables(
    history: History, macros: Mapping[str, str], current: Rcpt | None = None
) -> Variables:
    """Variables for the session as it stands (macro names without braces: ``auth_authen``).

    ``current`` is the RCPT being decided: it is the last recipient while its own stage runs.
    """
    found: Variables = {}
    if history.connect is not None and isinstance(connect := history.connect[1], Connect):
        found["remote_ip"] = _text(connect.address).removeprefix("IPv6:")
        found["remote_port"] = str(connect.port)
    if history.helo is not None and isinstance(helo := history.helo[1], Helo):
        found["helo_domain"] = _text(helo.name)
    if history.mail is not None and isinstance(mail := history.mail[1], Mail):
        found["sender"] = sender = _address(mail.address)
        found["sender_domain"] = _domain(sender)
    recipients = [_address(r.address) for _, r in history.recipients if isinstance(r, Rcpt)]
    if current is not None:
        recipients.append(_address(current.address))
    if recipients:
        found["recipients"] = recipients
        found["rcpt"] = recipients[-1]
        found["rcpt_domain"] = _domain(recipients[-1])
    for variable, macro in _FROM_MACROS.items():
        if value := macros.get(macro):
            found[variable] = value
    if macros.get("tls_version"):
        found["is_tls"] = "true"
    return found


#: Variables that come straight from a Postfix macro.
_FROM_MACROS = {
    "authenticated_as": "auth_authen",
    "local_ip": "daemon_addr",
    "local_port": "daemon_port",
    "listener": "daemon_name",
    "queue_id": "i",
}
