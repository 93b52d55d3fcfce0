"""The ingest mover's Lua scripts (worker/stream/mover.py says what each guarantees). Each
touches the keys of one slot only, so they run on a Redis Cluster too."""

from __future__ import annotations

from typing import Final

ACQUIRE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local generation = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '/' .. generation
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return {generation, token}
"""
RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: ingest stream, lease. ARGV: token, group, consumer, count, mode ('new' or a claim
# cursor). Nothing is handed out unless the caller still holds the lease.
READ: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
if ARGV[5] == 'new' then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                          'STREAMS', KEYS[1], '>')
  if read then return {'new', read} end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == ARGV[2] then return {'idle', fields['last-delivered-id']} end
  end
  return {'idle', '0-0'}
end
return {'claimed', redis.call('XAUTOCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, ARGV[5],
                              'COUNT', ARGV[4])}
"""
# KEYS: partition stream, its mark. ARGV: generation, then per entry: ingest id, field count,
# fields. Returns how many were added, or -1 when a newer mover has written here.
MOVE: Final = """
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
local generation = tonumber(ARGV[1])
local known = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0')
if generation < known then return -1 end
local mark = redis.call('HGET', KEYS[2], 'mark') or '0-0'
local added = 0
local i = 2
while i <= #ARGV do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  if after(id, mark) then
    local entry = {'src', id}
    for j = 1, 2 * count do entry[#entry + 1] = ARGV[i + 1 + j] end
    redis.call('XADD', KEYS[1], '*', unpack(entry))
    mark = id
    added = added + 1
  end
  i = i + 2 + 2 * count
end
redis.call('HSET', KEYS[2], 'generation', generation, 'mark', mark)
return added
"""
# Reading, moving and acking in one script, on a single Redis (every key on one server). Run
# right after a wait whose XREAD returned the entries past the group's last delivered id:
# the caller routed those (ARGV) and names their partitions (KEYS). KEYS: ingest stream,
# lease, then per partition its stream and its mark. ARGV: token, group, consumer,
# generation, count, then per entry its ingest id and its partition's place among the KEYS
# pairs (1, 2, ...). The entries XREADGROUP hands out are moved as long as they are the ones
# routed; any after a difference stay pending under this mover (its next read claims them,
# in order). Returns false when the lease is not ours, {-1} when a newer mover has written
# to one of the partitions (nothing done), else {added, skipped, left pending, last id}.
READ_MOVE: Final = """
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
local generation = tonumber(ARGV[4])
local marks = {}
for k = 3, #KEYS, 2 do
  if generation < tonumber(redis.call('HGET', KEYS[k + 1], 'generation') or '0') then
    return {-1}
  end
  marks[k] = redis.call('HGET', KEYS[k + 1], 'mark') or '0-0'
end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[5],
                        'STREAMS', KEYS[1], '>')
local handed = read and read[1][2] or {}
local added, skipped, done = 0, 0, {}
for n, entry in ipairs(handed) do
  local at = 4 + 2 * n
  if ARGV[at] ~= entry[1] then break end
  local k = 1 + 2 * tonumber(ARGV[at + 1])
  if after(entry[1], marks[k]) then
    redis.call('XADD', KEYS[k], '*', 'src', entry[1], unpack(entry[2]))
    marks[k] = entry[1]
    added = added + 1
  else
    skipped = skipped + 1
  end
  done[n] = entry[1]
end
for k = 3, #KEYS, 2 do
  redis.call('HSET', KEYS[k + 1], 'generation', generation, 'mark', marks[k])
end
if #done > 0 then
  redis.call('XACK', KEYS[1], ARGV[2], unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
local last = false
if #handed > 0 then last = handed[#handed][1] end
return {added, skipped, #handed - #done, last}
"""
