-- One SMTP session through the milter, driven by OpenDKIM's miltertest,
-- an MTA side written independently of ours.  The scenario comes in -D
-- variables; the outcome goes to standard output as name=value lines for
-- tests/integration/test_milter.py to check.
--
--   sock              the milter (inet:PORT@HOST or unix:PATH)
--   client_host       connect host name (default: [client_addr])
--   client_addr       the SMTP client's address (IPv4 or IPv6)
--   helo, sender, rcpt
--   resolve, ptr, name   {client_resolve}, {client_ptr}, {client_name}
--   auth              {auth_authen} at MAIL
--   message           path of the message (header, empty line, body)
--   eom_code, eom_status, eom_text   an SMTP reply expected at end of message
--
-- miltertest sends no macros on its own, and refuses a step the milter
-- negotiated away (SMFIP_NO*), so each step is checked first.

local names = {
  [SMFIR_ACCEPT] = "accept", [SMFIR_CONTINUE] = "continue",
  [SMFIR_DISCARD] = "discard", [SMFIR_REJECT] = "reject",
  [SMFIR_REPLYCODE] = "replycode", [SMFIR_SKIP] = "skip",
  [SMFIR_TEMPFAIL] = "tempfail",
}

local function check(result, step)
  if result ~= nil then error(step .. ": " .. tostring(result)) end
end

local function reply(conn)
  local code = mt.getreply(conn)
  return names[code] or ("code-" .. tostring(code))
end

-- Header fields as an MTA sends them: continuation lines joined by "\n",
-- the one space after the colon dropped unless SMFIP_HDR_LEADSPC.
local function send_message(conn, path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("a"):gsub("\r\n", "\n")
  file:close()
  local head, body = data:match("^(.-)\n\n(.*)$")
  if head == nil then head, body = data, "" end
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
    if name == nil then name, value = field, "" end
    if not leading_space then value = value:gsub("^ ", "", 1) end
    check(mt.header(conn, name, value), "header " .. name)
  end
  if not mt.test_option(conn, SMFIP_NOEOH) then check(mt.eoh(conn), "eoh") end
  body = body:gsub("\n", "\r\n")
  -- Postfix sends the body in chunks of at most 65535 octets.
  for start = 1, #body, 65535 do
    check(mt.bodystring(conn, body:sub(start, start + 65534)), "body")
  end
end

local conn = mt.connect(sock, 40, 0.05)
if conn == nil then error("cannot connect to " .. sock) end

local connect_macros = {}
for macro, value in pairs({["{client_resolve}"] = resolve, ["{client_ptr}"] = ptr,
                           ["{client_name}"] = name}) do
  connect_macros[#connect_macros + 1] = macro
  connect_macros[#connect_macros + 1] = value
end
if #connect_macros > 0 then
  mt.macro(conn, SMFIC_CONNECT, table.unpack(connect_macros))
end
check(mt.conninfo(conn, client_host or ("[" .. client_addr .. "]"), client_addr), "conninfo")
mt.echo("connect=" .. reply(conn))
check(mt.helo(conn, helo or "mail.example.net"), "helo")
if auth ~= nil then mt.macro(conn, SMFIC_MAIL, "{auth_authen}", auth) end
check(mt.mailfrom(conn, "<" .. (sender or "") .. ">"), "mail")
mt.echo("mail=" .. reply(conn))
check(mt.rcptto(conn, "<" .. (rcpt or "postmaster@own.example") .. ">"), "rcpt")
local rcpt_reply = reply(conn)
mt.echo("rcpt=" .. rcpt_reply)
if rcpt_reply ~= "continue" then
  mt.disconnect(conn)
  return
end

send_message(conn, message)
check(mt.eom(conn), "eom")
mt.echo("eom=" .. reply(conn))
local added = mt.getheader(conn, "Authentication-Results", 0)
if added ~= nil then mt.echo("ar=" .. added) end
mt.echo("inserted=" .. tostring(mt.eom_check(conn, MT_HDRINSERT, "Authentication-Results")))
mt.echo("deleted=" .. tostring(mt.eom_check(conn, MT_HDRDELETE, "Authentication-Results")))
if eom_code ~= nil then
  mt.echo("smtpreply=" .. tostring(mt.eom_check(conn, MT_SMTPREPLY, eom_code, eom_status,
                                                  eom_text)))
end
mt.disconnect(conn)
