"""DNS wire-format helpers for the hot path (sans-I/O): read a query's question without dnslib.

Parsing a whole query with dnslib costs tens of microseconds; the common query (one
question, no answer or authority records, at most an EDNS0 OPT record) is read here with a
few slices instead. Anything else returns None and goes to the slow path in `answer.py`,
which uses dnslib and decides between an answer, FORMERR, NOTIMP and dropping.

The fast path only walks the label lengths and lowercases the name once, in wire form (the
answer cache's key): the dotted text name is built on demand (`Question.qname`), which only
cache misses and forwards need. About 1 µs per query instead of 3.5 µs (bench/README.md).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
OPCODE_MASK = 0x7800
TYPE_OPT = 41
# RFC 1035 4.2.1: without EDNS0 a UDP message carries at most 512 bytes.
CLASSIC_UDP = 512
# What we advertise and the most we send over UDP even when a client claims more: 4096 is
# the common ceiling (BIND's default); larger datagrams fragment and get lost.
MAX_UDP = 4096
TCP_LIMIT = 65535
MAX_NAME = 255  # RFC 1035 2.3.4: a name is at most 255 octets on the wire


_TYPE_CLASS = struct.Struct("!HH")
_OPT = struct.Struct("!HHBBHH")


class Question(NamedTuple):
    """One query's question, plus what an answer must echo or honour. A NamedTuple, not a
    frozen dataclass: it is built for every query, and a tuple is built several times faster."""

    id: int
    flags: int  # the query's header flags (RD and CD are echoed)
    name: bytes  # the name in wire form, lowercased, with its root label: b"\x03web...\x00"
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as sent (the answer echoes its case)
    edns: bool
    udp_size: int  # the client's UDP payload size: 512 without EDNS0

    @property
    def qname(self) -> str:
        """Lowercased, dotted, with the trailing dot: "web.service.consul."."""
        return dotted(self.name)


def dotted(name: bytes) -> str:
    """A wire-form name (no compression, no dot inside a label) as text."""
    labels, pos = [], 0
    while n := name[pos]:
        labels.append(name[pos + 1 : pos + 1 + n])
        pos += 1 + n
    return b".".join(labels).decode("latin-1") + "." if labels else "."


def read_question(data: bytes) -> Question | None:
    """The fast path: the question of a plain query, or None for anything unusual."""
    size = len(data)
    if size < 17:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & (QR | OPCODE_MASK) or qd != 1 or an or ns or ar > 1:
        return None
    # Bounded: every round moves at least 2 bytes on, and stops at the end of the packet.
    pos = 12
    n = data[12]
    while n:
        if n > 63:  # a compression pointer or a reserved label type
            return None
        pos += 1 + n
        if pos >= size:
            return None
        n = data[pos]
    end = pos + 5
    if end > size or end - 12 - 4 > MAX_NAME:
        return None
    name = bytes(data[12 : pos + 1].lower())  # hashable even when `data` is a bytearray
    # A dot inside a label (or a 46-byte label, whose length byte is "."): the slow path.
    if b"." in name:
        return None
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos + 1)
    if ar:
        # The OPT record: root name, type 41, class = UDP size, TTL = ext-rcode/version/flags.
        if end + 11 > size or data[end] != 0:
            return None
        rtype, udp, _ext, version, _flags, rdlen = _OPT.unpack_from(data, end + 1)
        if rtype != TYPE_OPT or version != 0 or end + 11 + rdlen != size:
            return None
        udp = min(max(udp, CLASSIC_UDP), MAX_UDP)
        return Question(qid, flags, name, qtype, qclass, data[12:end], True, udp)
    if end != size:
        return None
    return Question(qid, flags, name, qtype, qclass, data[12:end], False, CLASSIC_UDP)


def splice(packed: bytes, q: Question) -> bytes:
    """A cached answer (packed with ID 0 and the lowercased question) for this query: its ID,
    its RD/CD bits and its question bytes, so a resolver using 0x20 case randomisation
    sees its own case. Compression pointers into the question stay valid: same length."""
    flags = (packed[2] << 8 | packed[3]) | (q.flags & (RD | 0x0010))
    qlen = len(q.question)
    return struct.pack("!HH", q.id, flags) + packed[4:12] + q.question + packed[12 + qlen :]


def error_header(data: bytes, rcode: int) -> bytes | None:
    """A bare response (no sections) for a query we could not read, or None when even the
    header is missing or the packet is itself a response (answering those invites loops)."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        return None
    return struct.pack("!HHHHHH", qid, QR | (flags & (OPCODE_MASK | RD)) | rcode, 0, 0, 0, 0)
