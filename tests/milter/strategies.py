"""Hypothesis strategies: one per packet type, covering every field's range."""

from __future__ import annotations

from hypothesis import strategies as st

from milterbridge.milter import (
    COMMANDS,
    REPLIES,
    Action,
    Family,
    MacroStage,
    Message,
    Protocol,
    messages,
)

cstr = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"x"))
u32 = st.integers(0, 2**32 - 1)
raw = st.binary(max_size=300)


def _connect() -> st.SearchStrategy[Message]:
    unknown = st.builds(messages.Connect, cstr, st.just(Family.UNKNOWN))
    known = st.builds(
        messages.Connect,
        cstr,
        st.sampled_from([Family.INET, Family.INET6, Family.UNIX]),
        st.integers(0, 65535),
        cstr,
    )
    return unknown | known


STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    messages.OptNeg: st.builds(messages.OptNeg, u32, u32.map(Action), u32.map(Protocol)),
    messages.Macro: st.builds(
        messages.Macro,
        st.binary(min_size=1, max_size=1),
        st.lists(st.tuples(cstr, cstr), max_size=5).map(tuple),
    ),
    messages.Connect: _connect(),
    messages.Helo: st.builds(messages.Helo, cstr),
    messages.Mail: st.builds(messages.Mail, cstr, st.lists(cstr, max_size=4).map(tuple)),
    messages.Rcpt: st.builds(messages.Rcpt, cstr, st.lists(cstr, max_size=4).map(tuple)),
    messages.Data: st.builds(messages.Data),
    messages.Header: st.builds(messages.Header, cstr, cstr),
    messages.EndOfHeaders: st.builds(messages.EndOfHeaders),
    messages.Body: st.builds(messages.Body, raw),
    messages.EndOfMessage: st.builds(messages.EndOfMessage, raw),
    messages.Abort: st.builds(messages.Abort),
    messages.Unknown: st.builds(messages.Unknown, cstr),
    messages.Quit: st.builds(messages.Quit),
    messages.QuitNoClose: st.builds(messages.QuitNoClose),
    messages.OptNegReply: st.builds(
        messages.OptNegReply,
        u32,
        u32.map(Action),
        u32.map(Protocol),
        st.lists(st.tuples(st.sampled_from(list(MacroStage)), cstr), max_size=7).map(tuple),
    ),
    messages.Continue: st.builds(messages.Continue),
    messages.Accept: st.builds(messages.Accept),
    messages.Reject: st.builds(messages.Reject),
    messages.Tempfail: st.builds(messages.Tempfail),
    messages.Discard: st.builds(messages.Discard),
    messages.ReplyCode: st.builds(messages.ReplyCode, cstr),
    messages.Skip: st.builds(messages.Skip),
    messages.Progress: st.builds(messages.Progress),
    messages.Shutdown: st.builds(messages.Shutdown),
    messages.ConnFail: st.builds(messages.ConnFail),
    messages.AddHeader: st.builds(messages.AddHeader, cstr, cstr),
    messages.InsertHeader: st.builds(messages.InsertHeader, u32, cstr, cstr),
    messages.ChangeHeader: st.builds(messages.ChangeHeader, u32, cstr, cstr),
    messages.AddRcpt: st.builds(messages.AddRcpt, cstr),
    messages.AddRcptPar: st.builds(messages.AddRcptPar, cstr, st.none() | cstr),
    messages.DelRcpt: st.builds(messages.DelRcpt, cstr),
    messages.ChangeFrom: st.builds(messages.ChangeFrom, cstr, st.none() | cstr),
    messages.ReplaceBody: st.builds(messages.ReplaceBody, raw),
    messages.Quarantine: st.builds(messages.Quarantine, cstr),
}

assert set(STRATEGIES) == set(COMMANDS.values()) | set(REPLIES.values())
