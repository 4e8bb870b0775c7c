"""The embedded service catalog: the subset of Consul's HTTP API that discovery needs.

- `model.py`    the catalog itself, pure (no asyncio, no sockets): services, checks, KV, and
                Consul's indexes; every change says which index moved
- `parse.py`    Consul's request bodies (case-insensitive keys) and Go durations
- `persist.py`  registrations and KV in the control plane's SQLite (control.db)
- `runtime.py`  the asyncio side: blocking-query wake-ups, TTL expiry, TCP and HTTP checks
- `dns.py`      meshdns's `Catalog` interface over the model, for `sluice up`'s DNS server

The HTTP routes are in mesh/api/routes_consul.py; docs/api.md ("Service catalog") is the
contract and says what was tested against what.
"""
