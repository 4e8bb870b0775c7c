"""DNS wire-format helpers for the hot path (sans-I/O): read a query's question without dnslib.

Parsing a whole query with dnslib costs tens of microseconds; the common query (one
question, no answer or authority records, at most an EDNS0 OPT record) is read here with a
few slices instead. Anything else returns None and goes to the slow path in `answer.py`,
which uses dnslib and decides between an answer, FORMERR, NOTIMP and dropping.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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
MAX_LABELS = 127


@dataclass(frozen=True, slots=True)
class Question:
    """One query's question, plus what an answer must echo or honour."""

    id: int
    flags: int  # the query's header flags (RD and CD are echoed)
    qname: str  # lowercased, dotted, with the trailing dot: "web.service.consul."
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as sent (the answer echoes its case)
    edns: bool
    udp_size: int  # the client's UDP payload size: 512 without EDNS0


def read_question(data: bytes) -> Question | None:
    """The fast path: the question of a plain query, or None for anything unusual."""
    if len(data) < 17:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & (QR | OPCODE_MASK) or qd != 1 or an or ns or ar > 1:
        return None
    pos, labels = 12, []
    for _ in range(MAX_LABELS + 1):  # bounded: a name has at most 127 labels
        n = data[pos]
        if n == 0:
            break
        if n > 63 or pos + 1 + n >= len(data):  # a compression pointer, or past the end
            return None
        label = data[pos + 1 : pos + 1 + n].lower()
        if b"." in label:  # a dot inside a label: the slow path decides
            return None
        labels.append(label)
        pos += 1 + n
    else:
        return None
    end = pos + 5
    if end > len(data) or end - 12 - 4 > MAX_NAME:
        return None
    qtype, qclass = struct.unpack_from("!HH", data, pos + 1)
    edns, udp_size = False, CLASSIC_UDP
    if ar:
        # The OPT record: root name, type 41, class = UDP size, TTL = ext-rcode/version/flags.
        if end + 11 > len(data) or data[end] != 0:
            return None
        rtype, size, _ext, version, _flags, rdlen = struct.unpack_from("!HHBBHH", data, end + 1)
        if rtype != TYPE_OPT or version != 0 or end + 11 + rdlen != len(data):
            return None
        edns, udp_size = True, min(max(size, CLASSIC_UDP), MAX_UDP)
    elif end != len(data):
        return None
    qname = b".".join(labels).decode("latin-1") + "."
    return Question(qid, flags, qname, qtype, qclass, data[12:end], edns, udp_size)


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
