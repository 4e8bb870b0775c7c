"""Passing a connection through unchanged: `sluice run`'s answer for destinations that are
not mesh services (sidecar/transparent.py decides; this only moves bytes).

The app's side (`Passthrough`) holds what the app sends until the connection to the
destination is up (at most `MAX_PENDING` bytes, then it stops reading), relays both ways
with flow control (a slow reader pauses the other side), and passes a half-close on
(`shutdown(SHUT_WR)` by either side reaches the other, and the reply still comes back).
A destination that refuses or does not answer within `CONNECT_TIMEOUT` gets the app's
connection reset. `on_close` runs once, when both sides are done, with the byte counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable

# Bytes an app may send to a passed-through destination before that connection is up.
MAX_PENDING = 256 * 1024
CONNECT_TIMEOUT = 10.0


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset, so the app sees ECONNRESET rather than an orderly end."""
    with contextlib.suppress(OSError, AttributeError):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Passthrough(asyncio.Protocol):
    """The app's side of a connection to a destination outside the mesh: bytes relayed."""

    def __init__(
        self,
        app: asyncio.Transport,
        dst: tuple[str, int],
        on_close: Callable[[Passthrough], None],
    ) -> None:
        self.app, self.dst, self.on_close = app, dst, on_close
        self.remote: asyncio.Transport | None = None
        self.pending = bytearray()
        self.bytes_in = self.bytes_out = 0
        self.at, self.started = time.time(), time.monotonic()
        self.error: str | None = None
        self.app_eof = self.remote_eof = self.closed = False

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            remote, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Remote(self), *self.dst), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "no answer in time"
            self.error = f"connect: {reason}"
            reset(self.app)
            self.close()
            return
        if self.closed:
            remote.close()
            return
        self.remote = remote
        if self.pending:
            remote.write(bytes(self.pending))
            self.pending.clear()
            self.app.resume_reading()
        if self.app_eof:
            remote.write_eof()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.remote is not None:
            self.remote.write(data)
            return
        self.pending += data
        if len(self.pending) > MAX_PENDING:
            self.app.pause_reading()

    def eof_received(self) -> bool:
        self.app_eof = True
        if self.remote is not None and not self.remote.is_closing():
            self.remote.write_eof()
        self._ended()
        return True  # half-close: the reply may still come

    def remote_ended(self) -> None:
        self.remote_eof = True
        if not self.app.is_closing():
            self.app.write_eof()
        self._ended()

    def _ended(self) -> None:
        if self.app_eof and self.remote_eof:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:  # the app reads slowly: stop reading the remote
        if self.remote is not None:
            self.remote.pause_reading()

    def resume_writing(self) -> None:
        if self.remote is not None:
            self.remote.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.app.is_closing():
            self.app.close()
        if self.remote is not None and not self.remote.is_closing():
            self.remote.close()
        self.on_close(self)  # the audit event: it has its duration and bytes now


class _Remote(asyncio.Protocol):
    """The connection to the outside destination, on behalf of one `Passthrough`."""

    def __init__(self, p: Passthrough) -> None:
        self.p = p

    def data_received(self, data: bytes) -> None:
        self.p.bytes_out += len(data)
        self.p.app.write(data)

    def eof_received(self) -> bool:
        self.p.remote_ended()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.p.close()

    def pause_writing(self) -> None:  # the remote reads slowly: stop reading the app
        self.p.app.pause_reading()

    def resume_writing(self) -> None:
        self.p.app.resume_reading()
