"""Re-record the HTTP captures (http_*.json) the replay tests feed to the HTTP session.

Run from the repo root with nginx installed: `.venv/bin/python tests/sidecar/captures/record_http.py`.
A recording relay sits between a real client (curl, httpx) and a real server (nginx, the
Python origin of tests/sidecar/httporigin.py); each read is one [direction, hex] entry.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.sidecar.httporigin import Nginx, OriginServer  # noqa: E402

OUT = pathlib.Path(__file__).parent


def relay(upstream_port: int, record: list[list[str]]) -> int:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)

    def pump(a: socket.socket, b: socket.socket, tag: str, lock: threading.Lock) -> None:
        while True:
            try:
                d = a.recv(65536)
            except OSError:
                d = b""
            if not d:
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)
                return
            with lock:
                record.append([tag, d.hex()])
            b.sendall(d)

    def serve() -> None:
        while True:
            c, _ = ls.accept()
            u = socket.create_connection(("127.0.0.1", upstream_port))
            lock = threading.Lock()
            threading.Thread(target=pump, args=(c, u, "c", lock), daemon=True).start()
            threading.Thread(target=pump, args=(u, c, "s", lock), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(ls.getsockname()[1])


def main() -> None:
    import httpx

    nginx = Nginx(pathlib.Path(tempfile.mkdtemp()))
    origin = OriginServer()
    try:
        rec: list[list[str]] = []
        base = f"http://127.0.0.1:{relay(nginx.port, rec)}"
        subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
             f"{base}/index.html", f"{base}/missing", f"{base}/admin/index.html",
             "-:", "-I", "-o", "/dev/null", f"{base}/index.html"],
            check=True,
        )  # fmt: skip
        time.sleep(0.3)
        (OUT / "http_curl_nginx.json").write_text(json.dumps(rec, indent=0))
        rec = []
        base = f"http://127.0.0.1:{relay(origin.port, rec)}"
        body = pathlib.Path(tempfile.mkdtemp()) / "body.bin"
        body.write_bytes(b"x" * 3000)
        subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
             "-H", "Expect: 100-continue", "--data-binary", f"@{body}",
             f"{base}/upload", f"{base}/chunked", f"{base}/upload2"],
            check=True,
        )  # fmt: skip
        time.sleep(0.3)
        (OUT / "http_curl_origin.json").write_text(json.dumps(rec, indent=0))
        rec = []
        with httpx.Client(base_url=f"http://127.0.0.1:{relay(origin.port, rec)}") as client:
            client.get("/a?x=1")
            client.post("/orders", json={"id": 7})
            client.put("/stream", content=iter([b"part1", b"part2"]))
            client.get("/chunked")
        time.sleep(0.3)
        (OUT / "http_httpx_origin.json").write_text(json.dumps(rec, indent=0))
    finally:
        nginx.stop()
        origin.stop()


if __name__ == "__main__":
    main()
