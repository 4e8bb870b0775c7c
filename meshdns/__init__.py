"""Sluice DNS server for service discovery (dnslib, asyncio UDP+TCP); grows in a later issue."""
