"""SMFIR_REPLYCODE text: validation as the MTAs apply it, and what the SMTP client sees.

Rules (protocol notes §3.2; Postfix milter8.c and Sendmail milter.c):

* every line is ``DDD`` + ``-`` (more lines follow) or ``DDD`` + space (last line), with the same
  code of class 4 or 5 on every line; lines are joined by CRLF with no CRLF at the end;
* an enhanced status code, if the text after the code starts with a digit, is ``C.S.D`` whose
  class C equals the reply code's first digit (Postfix calls ``550 4.1.1`` malformed);
* ``%`` must be written ``%%``: Sendmail replaces a reply containing a lone ``%`` with its
  default, Postfix drops the lone ``%``; either way the filter's text is not what it meant;
* no NUL anywhere (the packet's terminating NUL is the codec's business).
"""

from __future__ import annotations

import re

_LINE = re.compile(rb"([45][0-9][0-9])([ -])(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(rb"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |\Z)")


def reply_code_problem(text: bytes) -> str | None:
    """Why an MTA would refuse this SMFIR_REPLYCODE text, or None when it is acceptable."""
    if b"\0" in text:
        return "contains a NUL byte"
    if text.endswith(b"\r\n"):
        return "ends with CRLF (lines are joined by CRLF, none follows the last)"
    lines = text.split(b"\r\n")
    first_code: bytes | None = None
    for number, line in enumerate(lines, 1):
        match = _LINE.match(line)
        if match is None:
            return f"line {number} does not start with a 4xx/5xx code followed by ' ' or '-'"
        code, separator, rest = match.groups()
        if first_code is None:
            first_code = code
        elif code != first_code:
            return f"line {number} has code {code.decode()}, the first line {first_code.decode()}"
        is_last = number == len(lines)
        if separator == (b" " if not is_last else b"-"):
            expected = "' '" if is_last else "'-'"
            return f"line {number} must use {expected} after the code"
        if b"\r" in rest or b"\n" in rest:
            return f"line {number} contains a bare CR or LF"
        if rest[:1].isdigit():
            enhanced = _ENHANCED.match(rest)
            if enhanced is None:
                return f"line {number} has a malformed enhanced status code"
            if enhanced.group(1) != code[:1]:
                return f"line {number}: enhanced status class differs from the reply code class"
        if b"%" in rest.replace(b"%%", b""):
            return f"line {number} contains a lone '%' (write '%%')"
    return None


def is_valid_reply_code(text: bytes) -> bool:
    return reply_code_problem(text) is None


def reply_class(text: bytes) -> int:
    """The reply's class digit (4 or 5); only meaningful for valid text."""
    return text[0] - ord("0")


def client_text(text: bytes) -> bytes:
    """What the SMTP client reads for a valid reply: ``%%`` unescaped to ``%``."""
    return text.replace(b"%%", b"%")
