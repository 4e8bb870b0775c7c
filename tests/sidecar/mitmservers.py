"""Real processes for the mitmproxy addon tests: `mitmdump` from .venv-mitm with the addon
loaded, a handler that makes httporigin's Python origin speak WebSocket too (echo), nginx
over TLS with HTTP/2, and a WebSocket client on a raw socket (so no client library is
needed in either venv)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.sidecar.httporigin import EchoHandler, Nginx, free_port, stop, wait_port

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = REPO / ".venv-mitm" / "bin" / "mitmdump"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Mitmdump:
    """mitmdump with the Sluice addon on a free loopback port; its audit log and its own
    confdir (where mitmproxy writes its CA: mitmproxy-ca-cert.pem)."""

    def __init__(self, workdir: Path, mode: str, *options: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.confdir = workdir / "conf"
        self.audit = workdir / "audit.jsonl"
        self.log = workdir / "mitmdump.log"
        args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(self.port)]
        args += ["--mode", mode, "-s", str(REPO / "sidecar" / "mitm_addon.py")]
        for opt in (
            f"confdir={self.confdir}",
            f"sluice_audit_log={self.audit}",
            "flow_detail=0",
            *options,
        ):
            args += ["--set", opt]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            stop(self.proc)
            raise RuntimeError(f"mitmdump: {exc}:\n{self.log.read_text()}") from None

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def events(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        lines = self.audit.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_event(
        self, match: Callable[[dict[str, object]], bool], timeout: float = 5
    ) -> dict[str, object]:
        """The last audit event that `match` accepts, waiting for the sink's flush."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if match(e)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit event matched; events: {self.events()}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self.proc)


# WebSocket frames, and the Python origin's WebSocket echo (httporigin's origin, this handler).


def ws_frame(payload: bytes, opcode: int = 1, mask: bool = True) -> bytes:
    """One final frame (payloads under 126 bytes); clients mask, servers do not."""
    assert len(payload) < 126
    if not mask:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked


def ws_read(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame."""
    b0, b1 = read(2)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(read(2), "big")
    elif size == 127:
        size = int.from_bytes(read(8), "big")
    key = read(4) if b1 & 0x80 else b""
    payload = read(size)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


class WebSocketEchoHandler(EchoHandler):
    """httporigin's echo, and a WebSocket echo ("echo:" + each frame) on an upgrade."""

    def respond(self, seen: dict[str, object]) -> None:
        if self.headers.get("Upgrade", "").lower() != "websocket":
            super().respond(seen)
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws_accept(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while True:
                opcode, payload = ws_read(self._read)
                if opcode == 8:  # close: answer it and end
                    self.wfile.write(ws_frame(payload[:2], 8, mask=False))
                    return
                self.wfile.write(ws_frame(b"echo:" + payload, opcode, mask=False))
                self.wfile.flush()
        except (OSError, ValueError):
            return

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ValueError("the peer closed")
        return data


class WebSocketClient:
    """A WebSocket handshake and a few frames on a raw socket."""

    def __init__(self, port: int, path: str, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"closed after {head!r}")
            head += line
        self.status = int(head.split(b" ", 2)[1])
        self.headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (
                line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:] if line
            )
        }
        self.body = b""
        if "content-length" in self.headers:
            self.body = self.file.read(int(self.headers["content-length"]))

    def send(self, text: str) -> None:
        self.sock.sendall(ws_frame(text.encode()))

    def receive(self) -> tuple[int, bytes]:
        return ws_read(self.file.read)

    def close(self) -> None:
        try:
            self.sock.sendall(ws_frame(b"\x03\xe8", 8))
            self.receive()
        except OSError:
            pass
        self.file.close()
        self.sock.close()


# nginx over TLS with HTTP/2: what an external HTTPS service looks like to the proxy.


class TlsNginx(Nginx):
    """nginx on a free loopback port over TLS (self-signed, made here with openssl) with
    HTTP/2 and HTTP/1.1; `/echo` answers with the method, target and protocol it saw."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        super().__init__(
            workdir,
            {"index.html": b"external service\n", "admin/index.html": b"secret\n"},
            listen="ssl http2",
            server=f"""
                ssl_certificate {cert};
                ssl_certificate_key {key};
                location /echo {{
                    return 200 "$request_method $request_uri $server_protocol\\n";
                }}
            """,
            http="default_type text/plain;",
            connections=256,
        )
