"""Sluice inside mitmproxy: the policy addon (`addon.py`) and what it reads off a flow
(`flowinfo.py`). mitmproxy loads it through the script `sidecar/mitm_addon.py`; it runs in
its own virtualenv, `.venv-mitm` (docs/decisions/0010-mitmproxy-addon.md)."""
