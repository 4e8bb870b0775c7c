"""The origin and the peers of the HTTP sidecar benchmark (`http_sidecar.py`), each a child
process on a free loopback port with its config written to the run's temp dir: nginx
serving the 612-byte page (the origin, "direct"), HAProxy in HTTP mode with keep-alive on
both sides, nginx as a reverse proxy with upstream keep-alive, and mitmproxy in reverse
mode. Each returns None, saying why, where its binary is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

from common import REPO, Target, free_port, haproxy, start

PATH, INDEX_BYTES = "/index.html", 612  # nginx's classic welcome page size

NGINX_COMMON = """daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
{body}}}
"""
HAPROXY_HTTP = (
    "  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
    "  timeout client 5m\n  timeout server 5m\n  timeout http-keep-alive 5m\n"
)


def nginx(tmp: Path, name: str, body: str) -> Target | None:
    """An nginx of our own (config, pid, temp dirs under tmp/name); `@PORT@` in body is its port."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).is_file():
        print(f"{name}: nginx not installed (make bench-deps)")
        return None
    work = tmp / name
    work.mkdir()
    port = free_port()
    (work / "nginx.conf").write_text(
        NGINX_COMMON.format(dir=work, body=body.replace("@PORT@", str(port)))
    )
    argv = [binary, "-p", f"{work}/", "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")]
    return start(name, argv, port, tmp)


def origin(tmp: Path) -> Target | None:
    """nginx serving PATH, INDEX_BYTES long: the "direct" path."""
    www = tmp / "www"
    www.mkdir()
    page = "<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body>\n<h1>Welcome</h1>\n"
    tail = "</body></html>\n"
    (www / "index.html").write_text(
        page + "<p>" + "x" * (INDEX_BYTES - len(page + tail) - 8) + "</p>\n" + tail
    )
    assert (www / "index.html").stat().st_size == INDEX_BYTES
    for path in (tmp, www):  # nginx's worker runs as nobody when we are root
        path.chmod(0o755)
    body = f"  server {{\n    listen 127.0.0.1:@PORT@;\n    root {www};\n  }}\n"
    found = nginx(tmp, "origin", body)
    return None if found is None else Target("direct", found.port, found.proc)


def nginx_proxy(tmp: Path, up: int) -> Target | None:
    body = (
        f"  upstream origin {{ server 127.0.0.1:{up}; keepalive 64; keepalive_requests 10000000; }}\n"
        "  server {\n    listen 127.0.0.1:@PORT@;\n    location / {\n"
        '      proxy_pass http://origin;\n      proxy_http_version 1.1;\n      proxy_set_header Connection "";\n'
        "    }\n  }\n"
    )
    return nginx(tmp, "nginx", body)


def haproxy_http(tmp: Path, up: int) -> Target | None:
    return haproxy(tmp, ("127.0.0.1", up), HAPROXY_HTTP, maxconn=4096)


def mitmproxy(tmp: Path, up: int) -> Target | None:
    local = REPO / ".venv-mitm" / "bin" / "mitmdump"
    binary = str(local) if local.is_file() else shutil.which("mitmdump")
    if binary is None:
        print(
            "mitmproxy: no .venv-mitm/bin/mitmdump (make mitm) nor mitmdump on PATH; "
            "its rows skipped"
        )
        return None
    port = free_port()
    argv = [binary, "--mode", f"reverse:http://127.0.0.1:{up}", "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "-q", "--set", f"confdir={tmp / 'mitmproxy'}"]
    return start("mitmproxy", argv, port, tmp)
