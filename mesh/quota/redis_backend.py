"""The Redis quota backend: global buckets shared by several control-plane processes.

One Lua script takes a whole lease batch atomically (Redis runs scripts one at a time) on
Redis's own clock (`TIME`), so control planes on different hosts agree on refills. Per key
there is a hash `<prefix>b:<key>` {tokens, stamp} and a sorted set `<prefix>i:<key>` of the
instances that asked lately; both expire when unused. Keys of one batch may hash to
different Redis Cluster slots: use a single Redis (or a prefix with a hash tag).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mesh.quota import (
    ACTIVE_WINDOW,
    LEASE_FRACTION,
    LEASE_TTL,
    Grant,
    LeaseRequest,
    QuotaUnavailable,
)

# KEYS: bucket, instances, bucket, instances, ...
# ARGV: instance, active window, lease fraction, then rate, burst, want, returned per key.
# Returns, per key: {granted tokens, active instances}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local instance = ARGV[1]
local window = tonumber(ARGV[2])
local fraction = tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS / 2 do
  local bkey, ikey = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 3 + (i - 1) * 4
  local rate, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local want, returned = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local b = redis.call('HMGET', bkey, 'tokens', 'stamp')
  local tokens, stamp = tonumber(b[1]), tonumber(b[2])
  if tokens == nil or stamp == nil then tokens, stamp = burst, now end
  if now > stamp then
    tokens = math.min(burst, tokens + (now - stamp) * rate)
    stamp = now
  end
  tokens = math.min(burst, tokens + math.max(0, returned))
  if want > 0 then redis.call('ZADD', ikey, now, instance) end
  redis.call('ZREMRANGEBYSCORE', ikey, '-inf', now - window)
  local active = redis.call('ZCARD', ikey)
  local cap = math.max(1, math.floor(rate * fraction / math.max(1, active)))
  local grant = math.max(0, math.min(math.ceil(want), cap, math.floor(tokens + 1e-9)))
  tokens = math.max(0, tokens - grant)
  redis.call('HSET', bkey, 'tokens', string.format('%.17g', tokens),
             'stamp', string.format('%.17g', stamp))
  local ttl = math.ceil((burst / rate + 60) * 1000)
  redis.call('PEXPIRE', bkey, ttl)
  redis.call('PEXPIRE', ikey, math.ceil((window + 60) * 1000))
  out[i] = {tostring(grant), active}
end
return out
"""


class RedisQuota:
    """Global token buckets in Redis, under `prefix`."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "sluice:quota:", timeout: float = 0.5) -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script = self.redis.register_script(_SCRIPT)

    async def lease(self, instance: str, leases: Sequence[LeaseRequest]) -> list[Grant]:
        if not leases:
            return []
        keys: list[str] = []
        args: list[str | float] = [instance, ACTIVE_WINDOW, LEASE_FRACTION]
        for r in leases:
            keys += [f"{self.prefix}b:{r.key}", f"{self.prefix}i:{r.key}"]
            args += [r.tokens_per_second, r.burst, max(0.0, r.want), max(0.0, r.returned)]
        try:
            rows = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise QuotaUnavailable(f"Redis: {str(exc) or type(exc).__name__}") from exc
        return [
            Grant(r.key, float(row[0]), LEASE_TTL, int(row[1]))
            for r, row in zip(leases, rows, strict=True)
        ]

    async def close(self) -> None:
        await self.redis.aclose()
