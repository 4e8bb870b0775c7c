"""Consul DNS semantics over a `Catalog` (sans-I/O): query bytes in, answer bytes out.

`Answerer.handle(data, tcp)` returns the answer's bytes, a `Forward` (a name outside our
domain, for the server to send to a recursor) or None (drop). Names, as Consul documents
them (developer.hashicorp.com/consul/docs/services/discovery/dns-static-lookups):

    [tag.]name.service[.dc].DOMAIN     A/AAAA of healthy instances; SRV with A/AAAA extras
    _name._tag.service[.dc].DOMAIN     RFC 2782 SRV; `_tcp` means "any tag", as in Consul
    name.node[.dc].DOMAIN              the node's address
    hex.addr[.dc].DOMAIN               the address spelled in hex (SRV targets use these)

Healthy means passing, or warning unless `only_passing` (Consul's `dns_config.only_passing`,
default false). A known service with no healthy instance is NXDOMAIN, like Consul; every
NXDOMAIN and NODATA carries the zone's SOA in the authority section. Answers are shuffled;
UDP answers are trimmed to the client's EDNS0 size (512 without EDNS0) with TC set.

DNS-VIP mode: a service named in `vips` (static, `--vip`), or one for which the sidecar of
app `vip_app` registered a route listener (service `<app>-sidecar`, tag `sluice-route`,
Meta `route_service`: sidecar/catalog.py), is answered with that listener's address
instead of the service's instances. Registrations of any health count, passing ones first
(a crashed sidecar's names keep failing closed until the catalog removes its entries).

Answers are cached packed, per (name, type, class, size limit, EDNS), and stay valid while
the catalog's `index` is unchanged: a hit costs a dict lookup and one splice of the
query's ID and question (`wire.splice`). Each entry holds a few pre-shuffled variants,
served in turn, so repeated queries still see the instances in changing order.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from dnslib import AAAA as RD_AAAA
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib import NS as RD_NS
from dnslib import SOA as RD_SOA
from dnslib import SRV as RD_SRV
from dnslib import A as RD_A

from meshdns.catalog import Catalog, Instance
from meshdns.wire import MAX_UDP, TCP_LIMIT, Question, error_header, read_question, splice

A, NS, SOA, AAAA, SRV, ANY = 1, 2, 6, 28, 33, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
IN = 1
ROUTE_SUFFIX, ROUTE_TAG = "-sidecar", "sluice-route"  # as sidecar/catalog.py registers them
VARIANTS = 4  # pre-shuffled orders kept per cached answer
MAX_CACHE = 20_000  # entries; the cache is emptied when full (random names cannot grow it)
SOA_TIMES = (3600, 600, 86400, 0)  # refresh, retry, expire, minimum: Consul's defaults


@dataclass(frozen=True, slots=True)
class Vip:
    """DNS-VIP mode: a service answered with the loopback address of the app's sidecar."""

    address: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    """A query for a name outside our domain: send `data` to a recursor."""

    data: bytes
    question: Question


@dataclass(slots=True)
class AnswerStats:
    queries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_revalidated: int = 0
    truncated: int = 0
    formerr: int = 0
    dropped: int = 0
    forwarded: int = 0
    rcodes: dict[int, int] = field(default_factory=dict)


# What a service's answer depends on: datacenter, its instances, the app's route listeners.
_Inputs = tuple[str, Sequence[Instance] | None, Sequence[Instance] | None]


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    variants: tuple[bytes, ...]
    rcode: int
    truncated: bool
    # A service's answer: what it was built from (`Answerer._inputs`). After a catalog
    # change elsewhere, an entry whose inputs are unchanged is kept instead of rebuilt.
    service: str | None = None
    inputs: _Inputs | None = None


# One answer record and the extra records that go with it (an SRV target's address).
_Unit = tuple[RR, tuple[RR, ...]]
_Resolved = tuple[int, list[_Unit], str | None, _Inputs | None]


class Answerer:
    def __init__(
        self,
        catalog: Catalog,
        *,
        domain: str = "consul.",
        ttl: int = 0,
        vips: Mapping[str, Vip] | None = None,
        vip_app: str | None = None,
        vip_instance: str | None = None,
        recursion: bool = False,
        only_passing: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.domain = domain.strip(".").lower() + "."
        self.ttl = ttl
        self.vips = dict(vips or {})
        # DNS-VIP from the catalog: this app's sidecar route listeners (one instance's).
        self.vip_service = vip_app.lower() + ROUTE_SUFFIX if vip_app else None
        self.vip_instance = vip_instance
        self.recursion = recursion  # recursors configured: RA is set, others are forwarded
        self.only_passing = only_passing
        self.stats = AnswerStats()
        self._suffix = "." + self.domain
        self._rng = rng or random.Random()
        self._cache: dict[tuple[bytes, int, int, int, bool], _Entry] = {}
        self._turn = itertools.count()

    def handle(self, data: bytes, tcp: bool = False) -> bytes | Forward | None:
        stats = self.stats
        stats.queries += 1
        q = read_question(data) or self._slow_question(data)
        if not isinstance(q, Question):
            return q
        limit = TCP_LIMIT if tcp else q.udp_size
        # Keyed on the wire-form name: a hit needs no text name. Only names in our domain
        # are ever cached, so a hit needs no domain check either.
        key = (q.name, q.qtype, q.qclass, limit, q.edns)
        index = self.catalog.index
        entry = self._cache.get(key)
        if entry is not None and entry.index == index:
            stats.cache_hits += 1
        elif entry is not None and entry.service and entry.inputs == self._inputs(entry.service):
            # The catalog changed, but not this service: the answer stands.
            stats.cache_hits += 1
            stats.cache_revalidated += 1
            entry = self._cache[key] = replace(entry, index=index)
        else:
            qname = q.qname
            if qname != self.domain and not qname.endswith(self._suffix):
                return self._outside(data, q)
            stats.cache_misses += 1
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
            entry = self._build(q, limit, index)
            self._cache[key] = entry
        rcodes = stats.rcodes
        rcodes[entry.rcode] = rcodes.get(entry.rcode, 0) + 1
        if entry.truncated:
            stats.truncated += 1
        variants = entry.variants
        packed = variants[next(self._turn) % len(variants)] if len(variants) > 1 else variants[0]
        return splice(packed, q)

    def servfail(self, forward: Forward) -> bytes:
        """The answer when every recursor failed (or too many forwards are in flight)."""
        return splice(self._pack(forward.question, SERVFAIL, []), forward.question)

    def _outside(self, data: bytes, q: Question) -> bytes | Forward:
        if self.recursion:
            self.stats.forwarded += 1
            return Forward(data, q)
        # Not our zone and nobody to ask: REFUSED, as an authoritative-only server answers.
        self.stats.rcodes[REFUSED] = self.stats.rcodes.get(REFUSED, 0) + 1
        return splice(self._pack(q, REFUSED, [], aa=False), q)

    def _slow_question(self, data: bytes) -> Question | bytes | None:
        """Queries the fast path declined: dnslib decides FORMERR, NOTIMP, BADVERS or drop."""
        try:
            record = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types on garbage (DNSError, struct, Unicode)
            return self._refuse(data, FORMERR)
        h = record.header
        if h.qr:
            self.stats.dropped += 1
            return None
        if h.opcode != 0:
            return self._refuse(data, NOTIMP)
        if len(record.questions) != 1 or record.rr or record.auth:
            return self._refuse(data, FORMERR)
        opts = [r for r in record.ar if r.rtype == QTYPE.OPT]
        if len(opts) > 1:
            return self._refuse(data, FORMERR)
        qd = record.questions[0]
        labels = [bytes(label).lower() for label in qd.qname.label]
        if any(b"." in x or not 0 < len(x) < 64 for x in labels):
            return self._refuse(data, FORMERR)
        name = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
        wire = b"".join(bytes([len(x)]) + bytes(x) for x in qd.qname.label) + b"\0"
        question = wire + int(qd.qtype).to_bytes(2, "big") + int(qd.qclass).to_bytes(2, "big")
        if len(question) - 4 > 255:
            return self._refuse(data, FORMERR)
        size = 512
        if opts:
            version = (opts[0].ttl >> 16) & 0xFF
            size = min(max(opts[0].rclass, 512), MAX_UDP)
            if version != 0:  # RFC 6891 6.1.3: BADVERS (extended rcode 16 = 1 << 4 | 0)
                reply = DNSRecord(DNSHeader(id=h.id, qr=1, rd=h.rd), q=qd)
                reply.add_ar(EDNS0(udp_len=MAX_UDP, ext_rcode=1))
                packed: bytes = reply.pack()
                return packed
        return Question(
            h.id, (h.rd << 8), name, int(qd.qtype), int(qd.qclass), question, bool(opts), size
        )

    def _refuse(self, data: bytes, rcode: int) -> bytes | None:
        out = error_header(data, rcode)
        if out is None:
            self.stats.dropped += 1
        elif rcode == FORMERR:
            self.stats.formerr += 1
        return out

    # -- building answers (cache misses only) --------------------------------------------

    def _build(self, q: Question, limit: int, index: int) -> _Entry:
        rcode, units, service, inputs = self._resolve(q)
        if rcode != NOERROR or not units:
            # Not revalidated: negative answers carry the SOA, whose serial is the index.
            soa = rcode in (NOERROR, NXDOMAIN)  # RFC 2308: negative answers carry the SOA
            return _Entry(index, (self._pack(q, rcode, [], limit=limit, soa=soa),), rcode, False)
        count = min(VARIANTS, len(units))
        orders = []
        for i in range(count):
            order = list(units)
            self._rng.shuffle(order)
            if i == 0 or order not in orders:
                orders.append(order)
        variants = tuple(self._pack(q, NOERROR, order, limit=limit) for order in orders)
        truncated = variants[0][2] & 0x02 != 0
        return _Entry(index, variants, NOERROR, truncated, service, inputs)

    def _inputs(self, service: str) -> _Inputs:
        c = self.catalog
        vips = c.instances(self.vip_service) if self.vip_service is not None else None
        return (c.datacenter, c.instances(service), vips)

    def _resolve(self, q: Question) -> _Resolved:
        """(rcode, answer units, and for a service: its name and the inputs the answer was
        built from) for a name in our domain; NOERROR with no units is NODATA."""
        if q.qclass not in (IN, 255):  # IN, or ANY (QCLASS *)
            return REFUSED, [], None, None
        rel = q.qname[: -len(self.domain)].rstrip(".")
        labels = rel.split(".") if rel else []
        if not labels:
            return NOERROR, self._apex(q), None, None
        dc = self.catalog.datacenter
        kind_at = len(labels) - 1
        if labels[-1] not in ("service", "node", "addr") and len(labels) >= 2:
            if labels[-1] != dc:
                return NXDOMAIN, [], None, None
            kind_at -= 1
        kind, head = labels[kind_at], labels[:kind_at]
        if kind == "service" and head:
            name, tag = _service_name(head)
            if name is None:
                return NXDOMAIN, [], None, None
            inputs = self._inputs(name)  # read first: the answer is built from exactly these
            rcode, units = self._service(q, name, tag, inputs)
            return rcode, units, name, inputs
        if kind == "node" and len(head) == 1:
            node = self.catalog.node(head[0])
            if node is None:
                return NXDOMAIN, [], None, None
            return NOERROR, self._addresses(q.qname, q.qtype, [node.address]), None, None
        if kind == "addr" and len(head) == 1:
            address = _hex_address(head[0])
            if address is None:
                return NXDOMAIN, [], None, None
            return NOERROR, self._addresses(q.qname, q.qtype, [address]), None, None
        return NXDOMAIN, [], None, None

    def _service(
        self, q: Question, name: str, tag_filter: str | None, inputs: _Inputs
    ) -> tuple[int, list[_Unit]]:
        _, found, routes = inputs
        vip = self.vips.get(name) or self._catalog_vip(name, routes)
        if vip is not None:
            return NOERROR, self._vip(q, vip)
        healthy = [
            i
            for i in found or ()
            if (i.health == "passing" or (i.health == "warning" and not self.only_passing))
            and (tag_filter is None or tag_filter in i.tags)
        ]
        if not healthy:
            return NXDOMAIN, []
        if q.qtype == SRV:
            return NOERROR, [self._srv(q.qname, i) for i in healthy]
        return NOERROR, self._addresses(q.qname, q.qtype, [i.address for i in healthy])

    def _catalog_vip(self, name: str, routes: Sequence[Instance] | None) -> Vip | None:
        """The listener the app's sidecar registered for service `name` (`routes`: the
        instances of `<app>-sidecar`), if any: passing registrations first, then by
        instance and address (stable when several match)."""
        found: list[tuple[bool, str, str, int, Vip]] = []
        for i in routes or ():
            meta = i.meta
            if ROUTE_TAG not in i.tags or meta.get("route_service", "").lower() != name:
                continue
            if self.vip_instance is not None and meta.get("instance") != self.vip_instance:
                continue
            if not _hex(i.address) or not 0 < i.port < 65536:
                continue  # a VIP is an IP address: a host name cannot be answered with A
            vip = Vip(i.address, i.port)
            found.append((i.health != "passing", meta.get("instance", ""), i.address, i.port, vip))
        return min(found, key=lambda f: f[:4])[4] if found else None

    def _vip(self, q: Question, vip: Vip) -> list[_Unit]:
        if q.qtype == SRV:
            if vip.port is None:
                return []
            target = f"{_hex(vip.address)}.addr.{self.catalog.datacenter}.{self.domain}"
            extra = self._addresses(target, ANY, [vip.address])[0][0]
            return [(self._rr(q.qname, SRV, RD_SRV(1, 1, vip.port, target)), (extra,))]
        return self._addresses(q.qname, q.qtype, [vip.address])

    def _srv(self, qname: str, inst: Instance) -> _Unit:
        dc = self.catalog.datacenter
        if inst.address == inst.node_address:
            target = f"{inst.node}.node.{dc}.{self.domain}"
        elif _hex(inst.address):
            target = f"{_hex(inst.address)}.addr.{dc}.{self.domain}"
        else:  # a hostname: the client resolves it itself
            target = inst.address.rstrip(".") + "."
        srv = self._rr(qname, SRV, RD_SRV(1, 1, inst.port, target))
        extras = tuple(u[0] for u in self._addresses(target, ANY, [inst.address]))
        return (srv, extras)

    def _addresses(self, name: str, qtype: int, addresses: Sequence[str]) -> list[_Unit]:
        units: list[_Unit] = []
        seen: set[str] = set()
        for text in addresses:
            if text in seen:
                continue
            seen.add(text)
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue  # a hostname has no A record of ours
            if ip.version == 4 and qtype in (A, ANY):
                units.append((self._rr(name, A, RD_A(text)), ()))
            elif ip.version == 6 and qtype in (AAAA, ANY):
                units.append((self._rr(name, AAAA, RD_AAAA(text)), ()))
        return units

    def _apex(self, q: Question) -> list[_Unit]:
        if q.qtype in (SOA, ANY):
            return [(self._soa(), ())]
        if q.qtype == NS:
            return [(self._rr(self.domain, NS, RD_NS("ns." + self.domain)), ())]
        return []

    def _soa(self) -> RR:
        serial = self.catalog.index & 0xFFFFFFFF
        rdata = RD_SOA("ns." + self.domain, "hostmaster." + self.domain, (serial, *SOA_TIMES))
        return self._rr(self.domain, SOA, rdata)

    def _rr(self, name: str, rtype: int, rdata: object) -> RR:
        return RR(_label(name), rtype, IN, self.ttl, rdata)

    def _pack(
        self,
        q: Question,
        rcode: int,
        units: list[_Unit],
        *,
        limit: int = TCP_LIMIT,
        soa: bool = False,
        aa: bool = True,
    ) -> bytes:
        """Pack with ID 0 and the lowercased question; keep as many whole units (an answer
        and its extras) as fit in `limit`, setting TC when some had to go."""
        kept = len(units)
        for _ in range(len(units) + 1):  # bounded: one unit fewer per round
            record = DNSRecord(
                DNSHeader(id=0, qr=1, aa=int(aa), ra=int(self.recursion), rcode=rcode),
                q=DNSQuestion(_label(q.qname), q.qtype, q.qclass),
            )
            extras: list[RR] = []
            for rr, more in units[:kept]:
                record.add_answer(rr)
                extras.extend(x for x in more if x not in extras)
            for x in extras:
                record.add_ar(x)
            if soa:
                record.add_auth(self._soa())
            if q.edns:
                record.add_ar(EDNS0(udp_len=MAX_UDP))
            if kept < len(units):
                record.header.tc = 1
            packed: bytes = record.pack()
            if len(packed) <= limit or kept == 0:
                return packed
            kept = _fewer(kept, len(packed), limit)
        raise AssertionError("unreachable: zero units always fit")


def _service_name(head: list[str]) -> tuple[str | None, str | None]:
    """The labels before `service` as (name, tag filter): `[tag.]name` or `_name._tag`."""
    if len(head) == 2 and head[0].startswith("_") and head[1].startswith("_"):
        name, tag = head[0][1:], head[1][1:]  # RFC 2782
        return name, (None if tag == "tcp" else tag)
    if len(head) <= 2:
        return head[-1], (head[0] if len(head) == 2 else None)
    return None, None


def _label(name: str) -> DNSLabel:
    # From bytes, not text: dnslib would IDNA-encode text and read backslash escapes.
    text = name.rstrip(".")
    return DNSLabel(tuple(x.encode("latin-1") for x in text.split(".")) if text else ())


def _fewer(kept: int, size: int, limit: int) -> int:
    # Scale down by the overshoot, at least one unit per round.
    return max(0, min(kept - 1, kept * limit // size))


def _hex(address: str) -> str:
    """Consul's `.addr.` spelling: the address's bytes in hex ("" for a hostname)."""
    try:
        return ipaddress.ip_address(address).packed.hex()
    except ValueError:
        return ""


def _hex_address(label: str) -> str | None:
    if len(label) not in (8, 32):
        return None
    try:
        return str(ipaddress.ip_address(bytes.fromhex(label)))
    except ValueError:
        return None


__all__ = ["RCODE", "Answerer", "Forward", "Vip"]
