"""meshdns: service discovery over DNS with Consul's semantics (see meshdns/README.md).

catalog.py (the Catalog interface; a YAML-file provider), consul_catalog.py (a provider on
Consul's HTTP API via py-consul), wire.py and answer.py (sans-I/O: query bytes in, answer
bytes out), forward.py and server.py (asyncio UDP and TCP on uvloop).
"""
