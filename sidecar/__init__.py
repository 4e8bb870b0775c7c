"""Sluice data plane: sans-I/O protocol codecs and the asyncio sidecar driver."""
