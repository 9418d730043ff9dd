#!lua
-- reach: one bounded step of a breadth-first search of the call graph for a cycle.
--
-- KEYS     kids:<node> (SET) of each node to expand, in breadth-first order (the
--          first one from ARGV[3]: it was cut short)
-- ARGV[1]  target request id
-- ARGV[2]  budget: nodes and set members to look at
-- ARGV[3]  SSCAN cursor of the first node
-- ARGV[4]  stem of kids:<id> keys, ARGV[5] of res:<id>
-- Derived keys: kids:<id> and res:<id> of the children read from the sets are the
-- stems ARGV[4..5] (Keys.children(''), Keys.result('')) followed by the id: the stems
-- carry the namespace's hash tag, so these keys share the slot of KEYS.
-- A request waiting on a call from which it is reachable waits on itself.  The client
-- keeps the search (visited nodes, frontier, parents) between steps, so no step looks
-- at much more than budget nodes and members, however many children a node has.
-- Returns {found, expanded, cursor, pending}: found is the index (1-based) of the node
-- whose children include target (0: not found); expanded the number of nodes finished;
-- cursor the SSCAN cursor of the next one ('0': start it afresh); pending the children
-- to expand next, as pairs (child id, index of its parent node).  Children that are
-- finished (a result is stored) or have no children are left out: no cycle runs
-- through them now (a search that ends without a cycle is run again later).
local target, budget, cursor = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local kids_stem, res_stem = ARGV[4], ARGV[5]
local looked, expanded = 0, 0
local pending, seen = {}, {}
for node = 1, #KEYS do
  if looked >= budget then break end
  looked = looked + 1  -- a node costs a lookup even when it has no children
  repeat
    local page = redis.call('SSCAN', KEYS[node], cursor, 'COUNT',
                            math.max(10, math.min(1000, budget - looked)))
    cursor = page[1]
    for _, kid in ipairs(page[2]) do
      looked = looked + 1
      if kid == target then return {node, expanded, cursor, {}} end
      if not seen[kid] then
        seen[kid] = true
        if redis.call('EXISTS', kids_stem .. kid) == 1
            and redis.call('EXISTS', res_stem .. kid) == 0 then
          pending[#pending + 1] = kid
          pending[#pending + 1] = node
        end
      end
    end
  until cursor == '0' or looked >= budget
  if cursor == '0' then expanded = expanded + 1 end
end
return {0, expanded, cursor, pending}
