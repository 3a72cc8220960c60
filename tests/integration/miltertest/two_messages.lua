-- Two messages on one SMTP session: nothing of the first may leak into the
-- second (forged header indexes, DKIM state, the envelope verdict).
--
--   sock, client_addr, helo
--   first_sender, first      sender and message path of the first message
--   second_sender, second    the same for the second
-- Prints first.* and second.* lines (eom, ar, deleted).

local function check(result, step)
  if result ~= nil then error(step .. ": " .. tostring(result)) end
end

local names = {
  [SMFIR_ACCEPT] = "accept", [SMFIR_CONTINUE] = "continue",
  [SMFIR_REJECT] = "reject", [SMFIR_REPLYCODE] = "replycode",
  [SMFIR_TEMPFAIL] = "tempfail",
}

local function send_message(conn, path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("a"):gsub("\r\n", "\n")
  file:close()
  local head, body = data:match("^(.-)\n\n(.*)$")
  local fields = {}
  for line in (head .. "\n"):gmatch("(.-)\n") do
    if line:match("^[ \t]") and #fields > 0 then
      fields[#fields] = fields[#fields] .. "\n" .. line
    elseif line ~= "" then
      fields[#fields + 1] = line
    end
  end
  local leading_space = mt.test_option(conn, SMFIP_HDR_LEADSPC)
  for _, field in ipairs(fields) do
    local name, value = field:match("^([^:]*):(.*)$")
    if not leading_space then value = value:gsub("^ ", "", 1) end
    check(mt.header(conn, name, value), "header " .. name)
  end
  if not mt.test_option(conn, SMFIP_NOEOH) then check(mt.eoh(conn), "eoh") end
  check(mt.bodystring(conn, (body:gsub("\n", "\r\n"))), "body")
end

local function one_message(conn, label, from, path)
  check(mt.mailfrom(conn, "<" .. from .. ">"), label .. " mail")
  check(mt.rcptto(conn, "<postmaster@own.example>"), label .. " rcpt")
  mt.echo(label .. ".rcpt=" .. (names[mt.getreply(conn)] or "other"))
  send_message(conn, path)
  check(mt.eom(conn), label .. " eom")
  mt.echo(label .. ".eom=" .. (names[mt.getreply(conn)] or "other"))
  mt.echo(label .. ".ar=" .. tostring(mt.getheader(conn, "Authentication-Results", 0)))
  mt.echo(label .. ".deleted=" ..
          tostring(mt.eom_check(conn, MT_HDRDELETE, "Authentication-Results")))
end

local conn = mt.connect(sock, 40, 0.05)
if conn == nil then error("cannot connect to " .. sock) end
check(mt.conninfo(conn, "[" .. client_addr .. "]", client_addr), "conninfo")
check(mt.helo(conn, helo), "helo")
one_message(conn, "first", first_sender, first)
one_message(conn, "second", second_sender, second)
mt.disconnect(conn)
