"""The Sluice policy language: YAML schema, compiler, decision engine, SQL inspection.

Pure: nothing in this package opens a socket or imports asyncio (a test guards it).
"""
