"""Numbers of the milter wire protocol, named as libmilter's mfdef.h names them.

Everything here is copied from the protocol as both Sendmail's libmilter and Postfix's milter8.c
implement it (see docs/milter-protocol.md in the design notes, §1-§4). Nothing here does work.
"""

from __future__ import annotations

import enum

#: Size of the length word in front of every packet (MILTER_LEN_BYTES).
LENGTH_BYTES = 4

#: Largest body chunk an MTA sends and libmilter sends back in one REPLBODY (MILTER_CHUNK_SIZE).
CHUNK_SIZE = 65535

#: libmilter's default payload limit for any packet (MILTER_MAX_DATA_SIZE). Postfix accepts far
#: larger packets from filters (up to INT_MAX/2) and sends headers up to header_size_limit
#: (102400 by default), so our own default receive limit is larger; see DEFAULT_MAX_PACKET.
LIBMILTER_MAX_DATA = 65535

#: Our default receive limit (command byte plus payload). Large enough for Postfix's largest
#: header packet (header_size_limit 102400) and for 1 MiB macro packets (SMFIP_MDS_1M), small
#: enough that a garbage length word cannot make us buffer gigabytes.
DEFAULT_MAX_PACKET = 1024 * 1024 + 1

#: Highest protocol version we speak (Sendmail 8.14+, Postfix 2.6+ default).
MAX_VERSION = 6
#: Lowest version anyone still accepts (libmilter's SMFI_PROT_VERSION_MIN).
MIN_VERSION = 2


class Family(enum.Enum):
    """Address family byte of SMFIC_CONNECT (SMFIA_*)."""

    UNKNOWN = b"U"
    UNIX = b"L"
    INET = b"4"
    INET6 = b"6"


class Action(enum.IntFlag):
    """SMFIF_* action flags: what the filter may do at end-of-message."""

    NONE = 0
    ADDHDRS = 0x01  # SMFIR_ADDHEADER and SMFIR_INSHEADER
    CHGBODY = 0x02  # SMFIR_REPLBODY (SMFIF_MODBODY)
    ADDRCPT = 0x04  # SMFIR_ADDRCPT
    DELRCPT = 0x08  # SMFIR_DELRCPT
    CHGHDRS = 0x10  # SMFIR_CHGHEADER
    QUARANTINE = 0x20  # SMFIR_QUARANTINE
    CHGFROM = 0x40  # SMFIR_CHGFROM (v6)
    ADDRCPT_PAR = 0x80  # SMFIR_ADDRCPT_PAR (v6)
    SETSYMLIST = 0x100  # macro lists in the OPTNEG reply (v6)


#: SMFI_V2_ACTS: every action defined before protocol 6.
V2_ACTIONS = Action(0x3F)
#: SMFI_CURR_ACTS: every action defined.
ALL_ACTIONS = Action(0x1FF)


class Protocol(enum.IntFlag):
    """SMFIP_* protocol flags.

    Three kinds share one word: NO_* bits suppress a step, NR_* bits promise no reply to a step,
    and the rest are capabilities. The MTA's offer says "I can do this"; the filter's answer says
    "do this" -- so echoing the offer back disables every step (protocol notes §4.4, pitfall 9).
    """

    NONE = 0
    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80  # also SMFIP_NOHREPL
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000
    INTERNAL_RESERVED = 0x40000000
    TEST = 0x80000000


#: SMFI_CURR_PROT: every protocol bit a version 6 MTA offers.
ALL_PROTOCOL = Protocol(0x1FFFFF)
#: Bits reserved for the library's own use (SMFI_INTERNAL).
INTERNAL_PROTOCOL = Protocol(0x70000000)


class MacroStage(enum.IntEnum):
    """SMFIM_* stage numbers used for macro lists in the OPTNEG reply (note EOM < EOH)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6
