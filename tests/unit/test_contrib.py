"""contrib/postfix agrees with policyd and with the rules its README gives.

The integration tests run a Postfix built from these files; this checks
what a working Postfix alone would not catch: the order of restrictions,
a deliberate default_action, a timeout above policyd's own limits, and
socket addresses that match policyd's configuration defaults.
"""
from __future__ import annotations

import re

import Milter
import pytest

from policyd import config as config_module
from policyd.milter.protocol import MACROS
from tests.integration.postfix import CONTRIB, readme_blocks

MAIN_CF_FILES = ("main.cf.tcp", "main.cf.unix")

# Postfix's compiled-in queue_directory (`postconf -d queue_directory`),
# the directory a chrooted smtpd lives in.
QUEUE_DIRECTORY = "/var/spool/postfix"

# Postfix 3.7's default macro lists (`postconf -d milter_connect_macros`
# and so on), by the milter stage they are sent at.
POSTFIX_DEFAULT_MACROS = {
    Milter.M_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    Milter.M_ENVFROM: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
                       "{mail_host}", "{mail_mailer}"),
    Milter.M_ENVRCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    Milter.M_EOM: ("i",),
}

# Restrictions that may come before reject_unauth_destination without
# opening the server to relaying: they permit only your own clients.
SAFE_BEFORE_RELAY_CHECK = ("permit_mynetworks", "permit_sasl_authenticated")


def read(name: str) -> str:
    return (CONTRIB / name).read_text(encoding="utf-8")


def parse_main_cf(text: str) -> dict[str, str]:
    """main.cf(5): `name = value`, continued on lines that start with
    whitespace; comment lines and blank lines end nothing."""
    parameters: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert name is not None, f"continuation line without a parameter: {line!r}"
            parameters[name] += " " + line.strip()
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        assert equals and re.fullmatch(r"[a-z_0-9]+", name), f"not name = value: {line!r}"
        assert name not in parameters, f"{name} set twice"
        parameters[name] = value.strip()
    return parameters


def uncommented(text: str, names: tuple[str, ...]) -> str:
    """The text with the commented-out settings `names`, and their
    commented continuation lines, switched on."""
    lines, active = [], False
    for line in text.splitlines():
        match = re.match(r"#([a-z_0-9]+) =", line)
        if match:
            active = match.group(1) in names
        elif not re.match(r"#\s", line):
            active = False
        lines.append(line[1:] if active else line)
    return "\n".join(lines)


def restriction_list(value: str) -> list[str]:
    """A restriction list, split on commas and whitespace outside { }."""
    items, current, depth = [], "", 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append(current)
            current = ""
            continue
        current += char
    assert depth == 0, f"unbalanced braces in {value!r}"
    if current:
        items.append(current)
    # `check_policy_service { ... }` is one restriction with its argument.
    merged = []
    for item in items:
        if item.startswith("{") and merged:
            merged[-1] += " " + item
        else:
            merged.append(item)
    return merged


def policy_service(restriction: str) -> tuple[str, dict[str, str]]:
    """`check_policy_service { SOCKET, name=value, ... }` as (SOCKET, settings)."""
    match = re.fullmatch(r"check_policy_service \{\s*(.*?)\s*\}", restriction)
    assert match, f"use the {{ socket, name=value }} form: {restriction!r}"
    socket, *settings = [part.strip() for part in match.group(1).split(",")]
    return socket, dict(setting.split("=", 1) for setting in settings)


def seconds(value: str) -> float:
    """A Postfix time value: a number with an optional s/m/h/d unit."""
    match = re.fullmatch(r"(\d+)([smhd]?)", value)
    assert match, value
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def policy_restrictions(parameters: dict[str, str], parameter: str) -> list[str]:
    return [r for r in restriction_list(parameters[parameter])
            if r.startswith("check_policy_service")]


def quoted_policyd_settings(text: str) -> str:
    """The policyd.yaml fragment quoted in the comments of main.cf.unix."""
    block = re.search(r"^#   policy:\n(?:#     .*\n)+", text, re.MULTILINE)
    assert block, "main.cf.unix should quote the policyd settings"
    return "\n".join(line[4:] for line in block.group(0).splitlines())


def parse_policyd(fragment: str, path: str) -> config_module.PolicyConfig:
    """The policy section of a policyd.yaml fragment, validated by policyd.

    authserv_id is set so that parsing never asks the machine's resolver
    for this host's name (socket.getfqdn).
    """
    return config_module.parse("authserv_id: mx.test.example\n" + fragment, path).policy


@pytest.fixture(params=MAIN_CF_FILES)
def main_cf(request) -> tuple[str, str]:
    return request.param, read(request.param)


def test_policy_service_comes_after_the_relay_check(main_cf):
    name, text = main_cf
    restrictions = restriction_list(parse_main_cf(text)["smtpd_recipient_restrictions"])
    relay_check = restrictions.index("reject_unauth_destination")
    policy = [i for i, r in enumerate(restrictions) if r.startswith("check_policy_service")]
    assert len(policy) == 1, restrictions
    assert policy[0] > relay_check, f"{name}: policyd before reject_unauth_destination"
    before = restrictions[:relay_check]
    assert all(r in SAFE_BEFORE_RELAY_CHECK for r in before), \
        f"{name}: {before} before reject_unauth_destination may open relaying"


def test_policy_service_settings_are_deliberate(main_cf):
    name, text = main_cf
    [restriction] = policy_restrictions(parse_main_cf(text), "smtpd_recipient_restrictions")
    _, settings = policy_service(restriction)
    # Without it Postfix answers 451 4.3.5 during an outage; the README
    # explains the choice, so the file must make one.
    assert settings.get("default_action") == "DUNNO", f"{name}: {settings}"
    # Two DNS lookups for iprev (PTR, then A/AAAA), each up to dns.timeout.
    worst_case = config_module.SpfConfig().lookup_time_limit + 2 * config_module.DnsConfig().timeout
    assert seconds(settings["timeout"]) > worst_case, \
        f"{name}: Postfix would give up before policyd's own limits ({worst_case} s)"
    assert set(settings) <= {"timeout", "default_action", "max_idle", "max_ttl",
                             "request_limit", "try_limit", "retry_delay", "policy_context"}


def test_tcp_snippet_uses_policyd_default_listen_address():
    [restriction] = policy_restrictions(parse_main_cf(read("main.cf.tcp")),
                                        "smtpd_recipient_restrictions")
    socket, _ = policy_service(restriction)
    assert (socket,) == config_module.PolicyConfig().listen


def test_unix_snippet_and_its_policyd_settings_name_the_same_socket():
    text = read("main.cf.unix")
    [restriction] = policy_restrictions(parse_main_cf(text), "smtpd_recipient_restrictions")
    socket, _ = policy_service(restriction)
    kind, _, path = socket.partition(":")
    assert kind == "unix"
    assert not path.startswith("/"), "a chrooted smtpd sees paths relative to the queue"
    policy = parse_policyd(quoted_policyd_settings(text), "main.cf.unix")
    assert policy.listen == (f"unix:{QUEUE_DIRECTORY}/{path}",)
    assert policy.socket_group == "postfix"
    assert int(policy.socket_mode, 8) & 0o060 == 0o060, "the postfix group must connect"


def test_readme_quotes_the_same_policyd_settings():
    [fragment] = readme_blocks("yaml")
    assert parse_policyd(fragment, "README.md") == \
        parse_policyd(quoted_policyd_settings(read("main.cf.unix")), "main.cf.unix")


def test_optional_data_stage_asks_the_same_service(main_cf):
    name, text = main_cf
    parameters = parse_main_cf(text)
    assert "smtpd_data_restrictions" not in parameters, f"{name}: optional, so off"
    enabled = parse_main_cf(uncommented(text, ("smtpd_data_restrictions",)))
    assert policy_restrictions(enabled, "smtpd_data_restrictions") == \
        policy_restrictions(enabled, "smtpd_recipient_restrictions")


MILTER_SETTINGS = ("smtpd_milters", "milter_protocol", "milter_default_action")


def milter_section(readme: str) -> str:
    return readme.split("\n## The milter\n", 1)[1].split("\n## ", 1)[0]


def test_milter_settings_match_policyd_milter_defaults():
    text = read("main.cf.tcp")
    assert not set(MILTER_SETTINGS) & set(parse_main_cf(text)), \
        "the milter part stays commented out"
    milter = parse_main_cf(uncommented(text, MILTER_SETTINGS))
    # libmilter writes inet:PORT@HOST, Postfix inet:HOST:PORT.
    port, host = re.fullmatch(r"inet:(\d+)@(.+)",
                              config_module.MilterConfig().listen).groups()
    assert milter["smtpd_milters"] == f"inet:{host}:{port}"
    assert milter["milter_protocol"] == "6"
    assert milter["milter_default_action"] in ("accept", "tempfail")
    # The milter asks for its macros (setsymlist); a list set here would
    # replace Postfix's defaults for every milter.
    assert not [line for line in text.splitlines() if re.match(r"#?milter_\w+_macros", line)]


def test_unix_milter_lines_and_their_policyd_settings_name_the_same_socket():
    text = read("main.cf.unix")
    assert not set(MILTER_SETTINGS) & set(parse_main_cf(text)), \
        "the milter part stays commented out"
    milter = parse_main_cf(uncommented(text, MILTER_SETTINGS))
    kind, _, path = milter["smtpd_milters"].partition(":")
    assert kind == "unix"
    assert not path.startswith("/"), "a chrooted smtpd sees paths relative to the queue"
    assert milter["milter_protocol"] == "6"
    assert milter["milter_default_action"] in ("accept", "tempfail")
    block = re.search(r"^#   milter:\n(?:#     .*\n)+", text, re.MULTILINE)
    assert block, "main.cf.unix should quote the milter settings"
    fragment = "\n".join(line[4:] for line in block.group(0).splitlines())
    settings = config_module.parse("authserv_id: mx.test.example\n" + fragment,
                                   "main.cf.unix").milter
    assert settings.listen == f"unix:{QUEUE_DIRECTORY}/{path}"
    assert settings.socket_group == "postfix"
    assert int(settings.socket_mode, 8) & 0o060 == 0o060, "the postfix group must connect"
    assert not [line for line in text.splitlines() if re.match(r"#?milter_\w+_macros", line)]


def test_readme_quotes_the_milter_settings_of_main_cf_tcp():
    [block] = [block for block in readme_blocks() if block.startswith("smtpd_milters =")]
    shipped = parse_main_cf(uncommented(read("main.cf.tcp"), MILTER_SETTINGS))
    assert parse_main_cf(block) == {name: shipped[name] for name in MILTER_SETTINGS}
    assert block in milter_section(read("README.md"))


def test_readme_names_every_macro_the_milter_asks_for():
    section = milter_section(read("README.md"))
    rows = {line.split("|")[1].strip(): line.split("|")[2]
            for line in section.splitlines() if line.startswith("| ")}
    stages = {Milter.M_CONNECT: "connect", Milter.M_ENVFROM: "MAIL",
              Milter.M_ENVRCPT: "RCPT, end of message", Milter.M_EOM: "RCPT, end of message"}
    for stage, macros in MACROS.items():
        assert set(re.findall(r"`([^`]+)`", rows[stages[stage]])) >= set(macros), stage


def test_readme_says_which_macros_postfix_sends_unasked():
    """Those of MAIL, RCPT and end of message are in Postfix's defaults;
    the connect ones are not, which is why the milter has to ask."""
    for stage, macros in MACROS.items():
        missing = set(macros) - set(POSTFIX_DEFAULT_MACROS[stage])
        if stage == Milter.M_CONNECT:
            assert missing == set(macros)
        else:
            assert not missing, (stage, missing)
    section = milter_section(read("README.md"))
    assert "`" + " ".join(POSTFIX_DEFAULT_MACROS[Milter.M_CONNECT]) + "`" in section
    assert " ".join(POSTFIX_DEFAULT_MACROS[Milter.M_CONNECT] + MACROS[Milter.M_CONNECT]) \
        in " ".join(section.split())


def test_master_cf_has_one_smtpd_line_with_a_chroot_column():
    lines = [line for line in read("master.cf").splitlines()
             if line and not line.startswith("#")]
    assert len(lines) == 1, lines
    fields = lines[0].split()
    # master.cf(5): service type private unpriv chroot wakeup maxproc command
    assert fields[:2] == ["smtp", "inet"] and fields[7] == "smtpd", fields
    assert fields[4] in ("y", "n", "-"), fields


def test_readme_snippets_are_the_files_snippets():
    readme = read("README.md")
    assert "fail open" in readme and "fail closed" in readme
    snippets = [parse_main_cf(block) for block in readme_blocks()
                if re.match(r"smtpd_\w+_restrictions =", block)]
    shipped = parse_main_cf(uncommented(read("main.cf.tcp"), ("smtpd_data_restrictions",)))
    recipient = [s for s in snippets if "smtpd_recipient_restrictions" in s]
    fail_open = [s for s in recipient if "DUNNO" in s["smtpd_recipient_restrictions"]]
    assert fail_open == [{"smtpd_recipient_restrictions":
                          shipped["smtpd_recipient_restrictions"]}]
    data = [s for s in snippets if "smtpd_data_restrictions" in s]
    assert data == [{"smtpd_data_restrictions": shipped["smtpd_data_restrictions"]}]
    # The fail-closed alternative differs in default_action only, and
    # gives it in braces, since the value has spaces.
    [fail_closed] = [s for s in recipient if s not in fail_open]
    value = fail_closed["smtpd_recipient_restrictions"]
    assert "{ default_action = 451 4.3.5 " in value
    assert re.sub(r",\s*\{ default_action = [^}]*\}", ", default_action=DUNNO", value) == \
        shipped["smtpd_recipient_restrictions"]
