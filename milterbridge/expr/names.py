"""The names an expression may use: session variables and functions with their arity.

Kept apart from the parser and the evaluator because both check against them: the parser
refuses an unknown name at compile time, the evaluator implements exactly these.
"""

from __future__ import annotations

VARIABLES: frozenset[str] = frozenset(
    {
        "sender",
        "sender_domain",
        "rcpt",
        "rcpt_domain",
        "recipients",
        "authenticated_as",
        "listener",
        "remote_ip",
        "remote_port",
        "local_ip",
        "local_port",
        "protocol",
        "is_tls",
        "helo_domain",
        "priority",
        "queue_id",
    }
)
"""Every variable an expression may name. One the session does not know (yet) is empty."""

LIST_VARIABLES: frozenset[str] = frozenset({"recipients"})
"""Variables whose empty value is the empty list rather than the empty string."""

FUNCTIONS: dict[str, int] = {
    "is_empty": 1,
    "len": 1,
    "count": 1,
    "contains": 2,
    "starts_with": 2,
    "ends_with": 2,
    "to_lowercase": 1,
    "to_uppercase": 1,
    "trim": 1,
    "matches": 2,
    "is_ip_in_cidr": 2,
    "is_ipv4_addr": 1,
    "is_ipv6_addr": 1,
    "email_part": 2,
    "is_intersect": 2,
}
"""Every function an expression may call, with its (fixed) number of arguments."""
