"""Real HTTP servers for the HTTP sidecar tests: nginx (Debian's, with a config of our own)
and a Python origin on the standard library's HTTP/1.1 server for what nginx cannot show
(the request exactly as it arrived, chunked and close-delimited responses, an upgrade, an
origin that drops idle keep-alive connections). The origin's handler is a parameter: the
mitmproxy tests' origin (mitmservers.py) answers WebSocket upgrades with an echo."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

INDEX = b"<html><body>sluice test origin</body></html>\n" * 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """Wait until something listens on the port; fail at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited ({proc.returncode}) before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Nginx:
    """nginx on a free loopback port, with its own config, pid, error log and temp dirs in
    `workdir`, serving `pages` (path under the root: content) from workdir/www. `listen`
    adds options to its listen directive, `server` and `http` directives to those blocks."""

    def __init__(
        self,
        workdir: Path,
        pages: dict[str, bytes] | None = None,
        *,
        listen: str = "",
        server: str = 'location /echo-status { return 201 "created\\n"; }',
        http: str = "keepalive_requests 100000;",
        connections: int = 1024,
    ) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        self.root = workdir / "www"
        if pages is None:
            pages = {"index.html": INDEX, "admin/index.html": b"secret admin page\n"}
        for name, content in pages.items():
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / name).write_bytes(content)
        conf = workdir / "nginx.conf"
        # As root, nginx's workers run as nobody, who cannot read pytest's private temp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            f"""
            {user}
            worker_processes 1;
            daemon off;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log warn;
            events {{ worker_connections {connections}; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                {http}
                server {{
                    listen 127.0.0.1:{self.port} {listen};
                    root {self.root};
                    {server}
                }}
            }}
            """
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"nginx: {exc}") from None

    def stop(self) -> None:
        stop(self.proc)


class EchoHandler(BaseHTTPRequestHandler):
    """Records every request in `server.seen` and answers with it, as it saw it (JSON);
    subclasses answer some requests otherwise by overriding `respond`."""

    protocol_version = "HTTP/1.1"
    server: OriginServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower().endswith("chunked"):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        seen: dict[str, object] = {
            "method": self.command,
            "target": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.server.seen.append(seen)
        self.respond(seen)

    def respond(self, seen: dict[str, object]) -> None:
        payload = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class _Handler(EchoHandler):
    """What nginx cannot show: chunked and close-delimited responses, an upgrade, a slow
    answer, and idle keep-alive connections dropped."""

    timeout = 0.5  # an idle keep-alive connection is dropped after this (no Connection: close)

    def respond(self, seen: dict[str, object]) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
            return
        if path == "/close-delimited":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the server closes")
            self.close_connection = True
            return
        if path == "/ws":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:  # echo raw bytes until the peer closes (bounded by the timeout)
                try:
                    data = self.connection.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                self.connection.sendall(data.upper())
            self.close_connection = True
            return
        if path.startswith("/slow"):
            time.sleep(0.3)
        super().respond(seen)


class OriginServer(ThreadingHTTPServer):
    """The Python origin on a free loopback port, serving in a thread of its own: answers
    every request with the request as it saw it (JSON), save what `handler` answers
    otherwise."""

    daemon_threads = True

    def __init__(self, handler: type[EchoHandler] = _Handler) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[dict[str, object]] = []
        self.port = int(self.server_address[1])
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request seen, in order."""
        return [(str(s["method"]), str(s["target"])) for s in self.seen]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
