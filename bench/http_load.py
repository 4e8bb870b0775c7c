"""Open-loop HTTP/1.1 load at a fixed request rate: the latency half of `http_sidecar.py`.

wrk sends as fast as responses come back (a closed loop), so it cannot say what a proxy adds
at a given load. Here request i is due at start + i/rate whatever the server does. At every
tick of a timerfd (asyncio's and libuv's timers round to whole milliseconds, twice the
0.5 ms between requests at 2,000/s) each request that has come due goes out on an idle
keep-alive connection, or waits for the first one to come free. Latency runs from the due
time, not the send time, so a stall counts against every request it held up (no coordinated
omission). The send lag (send - due) of requests that found a connection free is reported
on its own: it is the generator's accuracy. Those that found all connections busy are
counted (`queued`).
Where permitted (root), the generator runs at SCHED_FIFO priority 1 (`--no-realtime` to
not): on a shared 2-core machine an ordinary process waits up to ~2 ms for a core at p99,
which would be the generator's error, not the server's. It uses under a fifth of a core at
2,000 requests/s and sleeps between ticks; the kernel caps real-time tasks at 95% anyway.

Raw asyncio Protocols on uvloop and a small response framer (Content-Length, chunked): one
request in flight per connection, no pipelining. Prints a summary, or one JSON object with
--json (what `http_sidecar.py` reads).

    python bench/http_load.py HOST:PORT [--path /index.html] [--rate 2000] [--duration 10]
        [--connections 32] [--warmup 1] [--no-realtime] [--json [--samples]]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import resource
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import uvloop

NS = 1_000_000_000
CLOCK_MONOTONIC, TFD_TIMER_ABSTIME = 1, 1  # <sys/timerfd.h>; time.monotonic_ns reads the same clock
MIN_TICK_NS = 100_000  # above 10,000 requests/s a tick sends several: Python wakes ~20 µs each
GRACE_S = 5.0  # after the last due time, how long answers may still come
MAX_RECONNECTS = 64  # a server that keeps closing connections ends the run instead
MAX_HEADER_BYTES = 64 * 1024
_FRAMING_HEADERS = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection)[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE
)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def timerfd(first_ns: int, period_ns: int) -> int | None:
    """A non-blocking fd that becomes readable at `first_ns` (CLOCK_MONOTONIC) and then every
    `period_ns`; None where timerfd is not available (then the loop's 1 ms timers pace)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    spec = _Itimerspec(_Timespec(*divmod(period_ns, NS)), _Timespec(*divmod(first_ns, NS)))
    if libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
        os.close(fd)
        return None
    return fd


class ResponseFramer:
    """Finds where each HTTP/1.1 response ends in a byte stream; yields their status codes.

    Enough for a benchmark's GETs: Content-Length, chunked bodies, and bodiless statuses.
    A response closed by the server with neither length nor chunking is not supported (the
    connection is dropped and the request counted as an error).
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.remaining = -1  # body bytes still to come; -1: reading headers; -2: chunked
        self.keep_alive = True

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        done: list[int] = []
        while True:
            if self.remaining == -1 and not self._headers():
                return done
            if self.remaining == -2 and not self._chunks():
                return done
            if self.remaining >= 0:
                if len(self.buf) < self.remaining:
                    return done
                del self.buf[: self.remaining]
                self.remaining = -1
                done.append(self.status)

    def _headers(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER_BYTES:
                raise ValueError("response headers too long")
            return False
        head = bytes(self.buf[: end + 2])
        del self.buf[: end + 4]
        status_line = head[: head.find(b"\r\n")]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        self.status = int(parts[1])
        length, chunked, self.keep_alive = -3, False, parts[0] != b"HTTP/1.0"
        for name, value in _FRAMING_HEADERS.findall(head):  # one C scan, not a loop per line
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            else:
                self.keep_alive = b"close" not in value.lower()
        if self.status < 200 or self.status in (204, 304):
            self.remaining = 0
        elif chunked:
            self.remaining = -2
        elif length >= 0:
            self.remaining = length
        else:
            raise ValueError("response without Content-Length or chunked encoding")
        return True

    def _chunks(self) -> bool:
        """Consume whole chunks; True once the last chunk (and trailers) are in."""
        while True:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(bytes(self.buf[:eol]).split(b";", 1)[0], 16)
            if size == 0:  # the last chunk, then trailer lines up to an empty one
                end = (
                    eol
                    if self.buf[eol + 2 : eol + 4] == b"\r\n"
                    else self.buf.find(b"\r\n\r\n", eol + 2)
                )
                if end < 0 or len(self.buf) < end + 4:
                    return False
                del self.buf[: end + 4]
                self.remaining = 0
                return True
            if len(self.buf) < eol + 2 + size + 2:
                return False
            del self.buf[: eol + 2 + size + 2]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight (`index` >= 0)."""

    transport: asyncio.Transport

    def __init__(self, load: Load) -> None:
        self.load = load
        self.framer = ResponseFramer()
        self.index = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.load.ready(self)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.framer.feed(data)
        except ValueError as exc:
            self.load.problem = str(exc)
            self.transport.close()
            return
        for status in statuses:
            self.load.answered(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)


class Load:
    """The schedule, the connections and what was measured for each request."""

    def __init__(self, request: bytes, rate: float, total: int, address: tuple[str, int]):
        self.request, self.rate, self.total, self.address = request, rate, total, address
        self.start = 0
        self.due = [0] * total
        self.sent = [0] * total
        self.done = [0] * total
        self.status = [0] * total
        self.next = 0  # first request not yet due-and-dispatched
        self.finished = 0
        self.waiting: deque[int] = deque()  # due requests with no idle connection
        self.queued = [False] * total  # found every connection busy when it came due
        self.idle: list[_Connection] = []
        self.open: set[_Connection] = set()
        self.reconnects = 0
        self.problem = ""
        self.all_done: asyncio.Future[None] | None = None

    # --- connections ---

    def ready(self, conn: _Connection) -> None:
        self.open.add(conn)
        self._free(conn)

    def answered(self, conn: _Connection, status: int) -> None:
        i, conn.index = conn.index, -1
        if i < 0:
            self.problem = "a response nobody asked for"
            conn.transport.close()
            return
        self.done[i], self.status[i] = time.monotonic_ns(), status
        self._finish()
        if conn.framer.keep_alive:
            self._free(conn)
        else:
            conn.transport.close()

    def lost(self, conn: _Connection) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.index >= 0:  # in flight: an error (status stays 0)
            self.done[conn.index] = time.monotonic_ns()
            conn.index = -1
            self._finish()
        if self.all_done is not None and not self.all_done.done():
            if self.reconnects < MAX_RECONNECTS:
                self.reconnects += 1
                asyncio.get_running_loop().create_task(self.connect())
            elif not self.open:
                self.problem = self.problem or "every connection closed"
                self.all_done.set_result(None)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Connection(self), *self.address)
        except OSError as exc:
            self.problem = f"connect: {exc}"

    def _free(self, conn: _Connection) -> None:
        if self.waiting:
            self._send(conn, self.waiting.popleft(), time.monotonic_ns())
        else:
            self.idle.append(conn)

    def _send(self, conn: _Connection, i: int, now: int) -> None:
        conn.index = i
        self.sent[i] = now
        conn.transport.write(self.request)

    def _finish(self) -> None:
        self.finished += 1
        done = self.all_done
        if self.finished == self.total and done is not None and not done.done():
            done.set_result(None)

    # --- the schedule ---

    def tick(self) -> None:
        """Dispatch every request due by now."""
        now = time.monotonic_ns()
        upto = min(self.total, (now - self.start) * int(self.rate * 1000) // (NS * 1000) + 1)
        for i in range(self.next, upto):
            self.due[i] = self.start + i * NS * 1000 // int(self.rate * 1000)
            if self.idle:
                self._send(self.idle.pop(), i, now)
            else:
                self.waiting.append(i)
                self.queued[i] = True
        self.next = max(self.next, upto)


async def run_load(
    host: str,
    port: int,
    path: str,
    rate: float,
    seconds: float,
    connections: int,
    warmup: float,
    samples: bool = False,
) -> dict[str, Any]:
    """Run the schedule (warm-up included) and return the summary of the measured part."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: sluice-bench\r\n\r\n"
    ).encode()
    skip = int(rate * warmup)
    total = skip + max(1, int(rate * seconds))
    load = Load(request, rate, total, (host, port))
    loop = asyncio.get_running_loop()
    load.all_done = loop.create_future()
    await asyncio.wait_for(asyncio.gather(*(load.connect() for _ in range(connections))), 10)
    if not load.open:
        return {"error": load.problem or "no connection"}
    load.start = time.monotonic_ns() + 20_000_000
    period = max(MIN_TICK_NS, int(NS / rate))
    fd = timerfd(load.start, period)
    ticker: asyncio.TimerHandle | None = None

    def on_timer() -> None:
        try:
            os.read(cast(int, fd), 8)
        except BlockingIOError:
            return
        load.tick()
        if load.next >= total:
            loop.remove_reader(cast(int, fd))

    def on_loop_timer() -> None:  # fallback: the loop's own timers, 1 ms resolution
        nonlocal ticker
        load.tick()
        if load.next < total:
            ticker = loop.call_later(period / NS, on_loop_timer)

    if fd is not None:
        loop.add_reader(fd, on_timer)
    else:
        ticker = loop.call_later((load.start - time.monotonic_ns()) / NS, on_loop_timer)
    cpu0 = _cpu_s()
    try:
        await asyncio.wait_for(asyncio.shield(load.all_done), total / rate + 1 + GRACE_S)
    except TimeoutError:
        load.problem = load.problem or "answers still missing after the grace period"
    finally:
        cpu = _cpu_s() - cpu0
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)
        if ticker is not None:
            ticker.cancel()
        for conn in list(load.open):
            conn.transport.close()
    timer = "timerfd" if fd is not None else "loop timer (1 ms)"
    return summarize(load, skip, cpu, timer, samples)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(ordered: Sequence[int], q: float) -> float:
    """Milliseconds at quantile q of sorted nanoseconds."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def summarize(
    load: Load, skip: int, cpu_s: float, timer: str, samples: bool = False
) -> dict[str, Any]:
    """Percentiles of the measured requests; with `samples`, their latencies and send lags
    in µs too (what `http_sidecar.py` pools over interleaved runs)."""
    measured = range(skip, load.total)
    ok = [i for i in measured if load.status[i] == 200 and load.done[i]]
    latency = sorted(load.done[i] - load.due[i] for i in ok)
    service = sorted(load.done[i] - load.sent[i] for i in ok)
    sent = [load.sent[i] for i in measured if load.sent[i]]
    # The generator's accuracy: how late requests went out that found a connection free
    # (the wait of the others is the server's doing, and counts in their latency).
    lag = sorted(
        load.sent[i] - load.due[i] for i in measured if load.sent[i] and not load.queued[i]
    )
    span = (max(sent) - min(sent)) / NS if len(sent) > 1 else 0.0
    wall = (load.due[load.total - 1] - load.start) / NS if load.due[load.total - 1] else 0.0
    out = {
        "rate": load.rate,
        "requests": len(measured),
        "sent": len(sent),
        "sent_with_warmup": sum(1 for t in load.sent if t),
        "ok": len(ok),
        "errors": len(measured) - len(ok),
        "achieved_rate": (len(sent) - 1) / span if span else 0.0,
        "p50_ms": pct(latency, 0.5),
        "p99_ms": pct(latency, 0.99),
        "p999_ms": pct(latency, 0.999),
        "max_ms": latency[-1] / 1e6 if latency else 0.0,
        "service_p50_ms": pct(service, 0.5),
        "service_p99_ms": pct(service, 0.99),
        "lag_p50_ms": pct(lag, 0.5),
        "lag_p99_ms": pct(lag, 0.99),
        "queued": sum(1 for i in measured if load.queued[i]),
        "reconnects": load.reconnects,
        "generator_cpu_pct": 100 * cpu_s / wall if wall else 0.0,
        "timer": timer,
        "problem": load.problem,
    }
    if samples:
        out["latency_us"] = [t // 1000 for t in latency]
        out["lag_us"] = [t // 1000 for t in lag]
    return out


def realtime() -> str:
    """Ask for SCHED_FIFO priority 1; the scheduling policy we run under."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        return "normal"
    return "fifo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT")
    parser.add_argument("--path", default="/index.html")
    parser.add_argument("--rate", type=float, default=2000, help="requests per second")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=1, help="seconds sent, not measured")
    parser.add_argument("--no-realtime", action="store_true", help="stay at normal priority")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", action="store_true", help="with --json: every latency")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit() or args.rate <= 0 or args.connections < 1:
        parser.error("expected HOST:PORT, a positive --rate and --connections")
    sched = "normal" if args.no_realtime else realtime()
    result = uvloop.run(
        run_load(
            host,
            int(port),
            args.path,
            args.rate,
            args.duration,
            args.connections,
            args.warmup,
            args.samples and args.json,
        )
    )
    result["scheduling"] = sched
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18} {value:.3f}" if isinstance(value, float) else f"{key:18} {value}")
    return 1 if result.get("error") or result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
