"""A bare TCP relay: the ceiling for any Python proxy on this machine.

One pair of asyncio.Protocols per connection on uvloop; `data_received` writes straight to
the other transport, with flow control (a peer's pause_writing pauses reading on the other
side). No parsing, no buffering, no logging: what `pg_sidecar.py` and `mysql_sidecar.py`
compare the sidecar to.

    python bench/relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One end of a relayed connection; `peer` is the other end once both are connected."""

    transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(self, peer: _Side | None = None) -> None:
        # The upstream side knows its app side from the start: a server that speaks first
        # (MySQL's greeting) may send before `create_connection` has returned.
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    """The app's side: connects upstream, holding what the app sends until that side is up."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.upstream = (host, port)
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:  # uvloop may deliver data before the upstream connects
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: _Side(self), *self.upstream)
        except OSError:
            self.transport.close()
            return
        self.peer = server
        if self.transport.is_closing():  # the app left while we were connecting
            server.transport.close()
        else:
            server.transport.write(b"".join(self.early))
            self.early.clear()


async def serve(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, port), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
