"""What the addon reads off a mitmproxy flow besides the policy attributes: the protocol
named in audit events, the destination service of a host, the sizes of the messages, and
whether a request may carry a body. Pure functions of mitmproxy's request and response
objects (typed `Any`: mitmproxy is not installed where mypy runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policies.compiler import host_name
from policies.globs import NameSet

# HTTP/2 and HTTP/3 requests of these methods are taken to have no body when they carry no
# Content-Length (HTTP/1.x says so by its framing).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def protocol(req: Any) -> str:
    """The audit event's protocol: "websocket" for a request that asks for a WebSocket,
    else the HTTP version: "http" (1.0 and 1.1, as on the plaintext path), "http2", "http3"."""
    if req.headers.get("upgrade", "").lower() == "websocket":
        return "websocket"
    if req.is_http2:
        return "http2"
    if req.is_http3:
        return "http3"
    return "http"


@dataclass(frozen=True, slots=True)
class ServiceMap:
    """Which destination service a request is for, by its host: one fixed name for all,
    else the first glob that matches the host (port ignored), else the host's first label
    (`api` for api.example.com; an IP address stays whole)."""

    fixed: str = ""
    globs: tuple[tuple[NameSet, str], ...] = ()

    @classmethod
    def parse(cls, fixed: str, items: list[str]) -> ServiceMap:
        """From the options; raises ValueError for an item that is not HOSTGLOB=SERVICE."""
        globs = []
        for item in items:
            glob, sep, name = item.partition("=")
            if not sep or not glob.strip() or not name.strip():
                raise ValueError(f"{item!r} is not HOSTGLOB=SERVICE")
            globs.append((NameSet.of([glob.strip()]), name.strip().lower()))
        return cls(fixed.strip().lower(), tuple(globs))

    def service(self, host: str) -> str:
        if self.fixed:
            return self.fixed
        name = host_name(host)
        for glob, service in self.globs:
            if glob.matches(name):
                return service
        if not name or name.startswith("[") or name.replace(".", "").isdigit():
            return name
        return name.split(".", 1)[0]


def may_have_body(req: Any) -> bool:
    length = req.headers.get("content-length")
    if length is not None:
        return bool(length.strip() != "0")
    if "transfer-encoding" in req.headers:
        return True
    return bool(req.is_http2 or req.is_http3) and req.method not in _BODILESS


def _fields_size(headers: Any) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.fields) + 2


def request_size(req: Any) -> int:
    """Bytes of the request as HTTP/1.1 text: its head and its body as transferred. (HTTP/2
    and HTTP/3 compress heads on the wire; mitmproxy keeps no wire counts per request.)"""
    data = req.data
    line = len(data.method) + len(data.path) + len(data.http_version) + 4
    return line + _fields_size(req.headers) + len(req.raw_content or b"")


def response_size(resp: Any) -> int:
    """Bytes of the response as HTTP/1.1 text, like `request_size`."""
    line = len(resp.data.http_version) + len(resp.data.reason) + 7
    return line + _fields_size(resp.headers) + len(resp.raw_content or b"")
