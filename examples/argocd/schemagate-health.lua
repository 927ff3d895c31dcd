-- Argo CD health check for schemagate.dev/SchemaMigration (kstatus conditions).
-- Healthy: the database is at the target version. Degraded: a person must act (failed or
-- dirty migration, drift, denied downgrade, missing Secret...). Suspended: paused.
-- Progressing: anything else (migrating, waiting for a pod, status not yet current).
local hs = { status = "Progressing", message = "Waiting for the schemagate controller" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation or 0
local observed = obj.status.observedGeneration or 0
if observed < generation then
  hs.message = "The controller has not looked at the latest spec yet"
  return hs
end
local ready, stalled, reconciling = nil, nil, nil
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Ready" then ready = c end
  if c.type == "Stalled" then stalled = c end
  if c.type == "Reconciling" then reconciling = c end
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Up to date"
  return hs
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end
if ready ~= nil and ready.reason == "Paused" then
  hs.status = "Suspended"
  hs.message = ready.message or "Paused"
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = reconciling.message or "Migrating"
elseif ready ~= nil then
  hs.message = ready.message or hs.message
end
return hs
