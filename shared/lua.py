"""Lua helpers shared by the producer's and the worker's scripts (each script is one atomic step).

now_s()      Redis' clock in seconds: leases, liveness and queue times agree across hosts.
kind(key)    the key's type ('none', 'list', 'set', ...): a script checks what it is about to write before
             its first write, so a key someone else filled with another type never leaves it half-done.
fail_turn()  end a turn as failed with a reason: its user message is taken back out of a conversation
             that still exists, the conversation is freed, the stream ends with an error event, and the
             turn's record, stream and index entries get their lifetimes (nothing is left without one).
"""

PRELUDE = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function kind(key)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then return t['ok'] end
  return t
end
local function fail_turn(turn, tid, err, a, fin, maxlen, sttl, rttl, running, queued)
  local stream = turn .. ':stream'
  local s = redis.call('HMGET', turn, 'user_message', 'conv_key')
  redis.call('HSET', turn, 'status', 'failed', 'error', err, 'finished_at', fin)
  redis.call('HDEL', turn, 'message')
  if s[2] and redis.call('EXISTS', s[2]) == 1 then
    if s[1] then redis.call('LREM', s[2] .. ':messages', -1, s[1]) end
    if redis.call('HGET', s[2], 'busy') == tid then redis.call('HDEL', s[2], 'busy') end
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'ev', 'error', 'a', a, 'error', err)
  redis.call('EXPIRE', stream, sttl)
  redis.call('EXPIRE', turn, rttl)
  redis.call('ZREM', running, tid)
  redis.call('ZREM', queued, tid)
end
"""
