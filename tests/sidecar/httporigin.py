"""Real HTTP servers for the HTTP sidecar tests: nginx (Debian's, with a config of our own)
and a Python origin on the standard library's HTTP/1.1 server for what nginx cannot show
(the request exactly as it arrived, chunked and close-delimited responses, an upgrade, an
origin that drops idle keep-alive connections)."""

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


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Nginx:
    """nginx serving `root` on a free loopback port, its own config, pid and temp dirs."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        self.root = workdir / "www"
        self.root.mkdir(parents=True)
        (self.root / "index.html").write_bytes(INDEX)
        (self.root / "admin").mkdir()
        (self.root / "admin" / "index.html").write_bytes(b"secret admin page\n")
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
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                keepalive_requests 100000;
                server {{
                    listen 127.0.0.1:{self.port};
                    root {self.root};
                    location /echo-status {{ return 201 "created\\n"; }}
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
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 0.5  # an idle keep-alive connection is dropped after this (no Connection: close)
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
        seen = {
            "method": self.command,
            "target": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.server.seen.append(seen)
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
        payload = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class OriginServer(ThreadingHTTPServer):
    """The Python origin: answers every request with the request as it saw it (JSON)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict[str, object]] = []
        self.port = int(self.server_address[1])
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
