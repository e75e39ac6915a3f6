"""The rules every role shares (celery_fleet.fleet): the size grammar, systemd quoting, what the fleet owns.

The cases are generated from the rules themselves: sizes from the parts of the grammar the module states,
quoting against a small re-implementation of how systemd reads an ``ExecStart=`` line, ownership from the
variables and options the installed Celery's own command line reads.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from fractions import Fraction
from math import floor

import click
import pytest
import yaml
from ansible_collections.celery_fleet.fleet.plugins.module_utils import ownership, sizes, systemd
from conftest import ROOT, load_plugin

from celery_fleet import cli_report

fleet_filters = load_plugin("collections/ansible_collections/celery_fleet/fleet/plugins/filter/fleet.py")
workers_plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]

# Size grammar -----------------------------------------------------------------------------------------

# The grammar as the module states it:  unit := ( "K" | "M" | "G" | "T" ) [ "B" | "iB" ]
_UNIT_RULE = re.search(
    r"^\s*unit\s*:=\s*\((?P<units>[^)]*)\)\s*\[(?P<suffixes>[^\]]*)\]", sizes.__doc__, re.M
)
assert _UNIT_RULE, "sizes.py states its unit rule"
UNITS = re.findall(r'"(\w+)"', _UNIT_RULE["units"])
SUFFIXES = ["", *re.findall(r'"(\w+)"', _UNIT_RULE["suffixes"])]
INTEGERS = ["1", "7", "64", "512", "1024", "4000000", "007"]
FRACTIONS = ["0.5", "1.5", "2.25", "0.125", "10.0", "3.1", "0.001"]


def casings(text: str) -> list[str]:
    """Every upper/lower-case spelling of ``text``."""
    return [
        "".join(chars) for chars in itertools.product(*(dict.fromkeys((c.lower(), c.upper())) for c in text))
    ]


def expected_bytes(number: str, unit: str) -> int:
    return floor(Fraction(number) * 1024 ** (1 + UNITS.index(unit.upper())))


ACCEPTED = [
    (f"{number}{spelling}", expected_bytes(number, unit))
    for number in INTEGERS + FRACTIONS
    for unit in UNITS
    for suffix in SUFFIXES
    for spelling in casings(unit + suffix)
]
BASES = [f"{n}{u}{s}" for n in ("512", "1.5") for u in UNITS for s in SUFFIXES]


def _refused() -> dict[str, list[object]]:
    """Strings that break exactly one rule of the grammar, by the rule they break."""
    letters = [c for c in string.ascii_letters if c.upper() not in UNITS]
    return {
        "bare number": [*INTEGERS, *FRACTIONS],
        "unknown unit": [f"512{c}" for c in letters] + [f"512{c}B" for c in letters if c not in "bB"],
        "unit and suffix": [f"512{u}{s}" for u in UNITS for s in ("i", "Bi", "iBB", "BB", "ib2", "ibyte")],
        "space inside": [
            base[:i] + space + base[i:]
            for base in BASES
            for i in range(len(base) + 1)
            for space in (" ", "\t", "\n")
            # A newline at the very end is the bug pinned in test_a_trailing_newline_is_refused.
            if not (space == "\n" and i == len(base))
        ],
        "trailing junk": [base + junk for base in BASES for junk in ("!", "/s", "x", "0", ".", "-", "+")],
        "sign": [sign + base for base in BASES for sign in ("-", "+")],
        "number form": [
            f"{n}{u}" for u in UNITS for n in (".5", "1.", "1..5", "1e3", "1,5", "1_000", "0x10")
        ],
        "zero or below a byte": [f"{z}{u}" for u in UNITS for z in ("0", "0.0", "000")]
        + ["0.0009K", "0.0005kb"],
        "not ASCII digits": ["\uff14G", "\u0664G", "4\u00a0G"],
        "empty": ["", "K", "GiB"],
    }


REFUSED = _refused()
NOT_STRINGS = [4096, 0, True, False, 1.5, None, b"4G", ["4G"], {"size": "4G"}]


def test_the_grammar_names_the_units_the_parser_multiplies():
    assert list(sizes.UNITS) == UNITS
    assert SUFFIXES == ["", "B", "iB"]
    assert [sizes.UNITS[u] for u in UNITS] == [1024**i for i in range(1, len(UNITS) + 1)]


@pytest.mark.parametrize(("text", "size"), ACCEPTED, ids=[t for t, _ in ACCEPTED])
def test_every_form_of_the_grammar_is_a_size_in_bytes_base_1024(text, size):
    assert sizes.parse_size(text) == size
    assert sizes.size_error("x", text, "Fix.") is None
    assert fleet_filters.size_bytes(text) == size
    assert fleet_filters.size_errors(text, "x", "Fix.") == []


def test_random_numbers_of_the_grammar_parse_exactly():
    rng = random.Random(1024)
    for _ in range(2000):
        unit = rng.choice(UNITS)
        # Up to 64 TiB: parse_size multiplies a float, exact to the byte below about 2**46 for 3 decimals.
        whole = str(rng.randint(1, 2**46 // sizes.UNITS[unit]))
        number = whole if rng.random() < 0.5 else f"{whole}.{rng.randint(0, 999):0{rng.randint(1, 3)}d}"
        spelling = rng.choice(casings(unit + rng.choice(SUFFIXES)))
        assert sizes.parse_size(number + spelling) == expected_bytes(number, unit), number + spelling


@pytest.mark.parametrize(
    "text",
    [t for ts in REFUSED.values() for t in ts],
    ids=[f"{r}:{t!r}" for r, ts in REFUSED.items() for t in ts],
)
def test_breaking_one_rule_of_the_grammar_is_refused(text):
    assert sizes.parse_size(text) is None
    error = sizes.size_error("memory_max", text, "Fix it.")
    assert error == f"memory_max {text!r} is not a size; write {sizes.FORMS}. Fix it."
    assert fleet_filters.size_errors(text, "memory_max", "Fix it.") == [error]


@pytest.mark.parametrize("base", ["512K", "1.5GiB", "4gb"])
def test_a_trailing_newline_is_refused(base):
    assert sizes.parse_size(base + "\n") is None


@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
def test_a_size_is_a_string(value):
    assert sizes.parse_size(value) is None
    assert sizes.size_error("memory_max", value, "Fix.")


@pytest.mark.parametrize("text", ["4\u212a", "4\u212aB", "4G\u0131B", "4M\u0130B"])
def test_unicode_case_folds_of_the_unit_letters_are_refused(text):
    assert sizes.parse_size(text) is None


def test_the_worker_plan_reads_sizes_with_the_same_grammar():
    host = {"cpus": 2, "app": "demo_app"}
    for text, size in ACCEPTED[:: max(1, len(ACCEPTED) // 60)]:
        plan = workers_plugin.celery_worker_plan(
            [{"name": "w", "queues": ["q"], "memory_max": text}], DEFAULTS, host
        )
        assert plan["errors"] == [], text
        assert plan["instances"][0]["memory_max"] == size, text
    for text in [REFUSED[rule][0] for rule in REFUSED if REFUSED[rule][0] != ""]:
        plan = workers_plugin.celery_worker_plan(
            [{"name": "w", "queues": ["q"], "memory_max": text}], DEFAULTS, host
        )
        assert any(f"memory_max {text!r} is not a size" in e for e in plan["errors"]), (text, plan["errors"])


# Ports and broker passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [1, 80, 6379, 65535, "1", "6379", "65535", "08080"])
def test_a_tcp_port_is_a_number_from_1_to_65535(port):
    assert fleet_filters.port_errors(port, "redis_port", "Fix.") == []


@pytest.mark.parametrize(
    "port",
    [
        0,
        -1,
        65536,
        10**6,
        "0",
        "65536",
        "",
        " 80",
        "80 ",
        "80\n",
        "+80",
        "-80",
        "8_0",
        "80.0",
        80.0,
        "0x50",
        "\uff18\uff10",
        "\u0668\u0660",
        True,
        False,
        None,
        [80],
        {"port": 80},
    ],
)
def test_anything_else_is_refused_with_the_variable_and_the_forms(port):
    [error] = fleet_filters.port_errors(port, "redis_port", "Fix it.")
    assert error == f"redis_port {port!r} is not a TCP port (1-65535). Fix it."


URL_SAFE = set(string.ascii_letters + string.digits + "._~-")


def test_every_url_safe_character_makes_a_password():
    for char in sorted(URL_SAFE):
        assert fleet_filters.password_errors(char * 16, "redis_password", "Fix.") == [], char


@pytest.mark.parametrize("char", sorted(set(map(chr, range(0x100))) - URL_SAFE))
def test_any_other_character_is_refused_and_the_password_never_shown(char):
    password = "a" * 16 + char
    [error] = fleet_filters.password_errors(password, "redis_password", "Fix.")
    assert error.startswith("redis_password is empty, a placeholder or not URL-safe")
    assert password not in error


@pytest.mark.parametrize(
    "password", ["", "a" * 15, "changeme", "password", None, 1234567890123456789, ["a" * 16]]
)
def test_a_short_or_non_string_password_is_refused(password):
    assert len(fleet_filters.password_errors(password, "redis_password", "Fix.")) == 1


@pytest.mark.parametrize("address", ["10.0.0.5", "127.0.0.1", "0.0.0.0", "::1", "fd00::5"])
def test_an_ip_address_is_accepted(address):
    assert fleet_filters.address_errors(address, "flower_address", "Fix.") == []


@pytest.mark.parametrize(
    "address",
    [
        "",
        "localhost",
        "10.0.0",
        "10.0.0.256",
        "010.0.0.5",
        " 10.0.0.5",
        "10.0.0.5 ",
        "10.0.0.5:6379",
        "10.0.0.5/32",
        "host --port=80",
        167772165,
        None,
        ["10.0.0.5"],
    ],
)
def test_anything_but_one_address_is_refused(address):
    [error] = fleet_filters.address_errors(address, "flower_address", "Fix.")
    assert error.startswith(f"flower_address {address!r} is not an IPv4 or IPv6 address")


def test_the_broker_address_must_be_ipv4_for_its_url():
    assert fleet_filters.address_errors("10.0.0.5", "a", "Fix.", False) == []
    [error] = fleet_filters.address_errors("fd00::5", "a", "Fix.", False)
    assert "is not an IPv4 address" in error


@pytest.mark.parametrize("network", ["10.0.0.0/24", "10.0.0.5", "10.0.0.5/32", "0.0.0.0/0", "fd00::/64"])
def test_a_network_is_accepted(network):
    assert fleet_filters.network_errors(network, "flower_allowed_clients", "Fix.") == []


@pytest.mark.parametrize(
    "network", ["10.0.0.5/24", "10.0.0.0/33", "10.0.0.0/", "any", "", " 10.0.0.0/24", None, 10]
)
def test_anything_but_a_network_is_refused(network):
    assert len(fleet_filters.network_errors(network, "flower_allowed_clients", "Fix.")) == 1


# systemd quoting ----------------------------------------------------------------------------------------


class Refused(ValueError):
    """systemd would refuse the line, or read it otherwise than as literal words."""


WHITESPACE = b" \t\n\r"
# systemd.syntax(7), "Quoting": the C escapes systemd resolves in a word.
SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}


def _cunescape_one(line: bytes, i: int) -> tuple[bytes, int]:
    """The bytes of the escape whose letter is at ``line[i]``, and where the word goes on (cunescape_one)."""
    if i >= len(line):
        raise Refused("a backslash ends the line")
    letter = chr(line[i])
    if letter in SIMPLE_ESCAPES:
        return SIMPLE_ESCAPES[letter].encode(), i + 1
    for mark, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if letter == mark:
            text = line[i + 1 : i + 1 + digits].decode("ascii", "replace")
            if len(text) != digits or not all(c in string.hexdigits for c in text):
                raise Refused(f"\\{mark} needs {digits} hex digits")
            value = int(text, base)
            if value == 0:
                raise Refused("systemd refuses an escaped NUL")
            # \xNN is one byte; \u and \U are a code point, written as UTF-8.
            return (bytes([value]) if mark == "x" else chr(value).encode()), i + 1 + digits
    if letter in "0123":
        text = line[i : i + 3].decode("ascii", "replace")
        if len(text) != 3 or not all(c in "01234567" for c in text):
            raise Refused("an octal escape needs 3 digits")
        if int(text, 8) == 0:
            raise Refused("systemd refuses an escaped NUL")
        return bytes([int(text, 8)]), i + 3
    raise Refused(f"unknown escape \\{letter}")


def systemd_words(line: str) -> list[tuple[bytes, int]]:
    """The words of an ExecStart= line, unquoted and unescaped (extract_first_word with UNQUOTE|CUNESCAPE).

    Each word comes with the number of quoted regions it was made of.
    """
    raw = line.encode()
    if any(b < 0x20 or b == 0x7F for b in raw):
        raise Refused("a raw control character in the line")
    words, i = [], 0
    while True:
        while i < len(raw) and raw[i] in WHITESPACE:
            i += 1
        if i >= len(raw):
            return words
        if raw[i : i + 1] == b";" and (i + 1 == len(raw) or raw[i + 1] in WHITESPACE):
            raise Refused("a lone ; separates two commands")
        word, quote, regions = bytearray(), None, 0
        while i < len(raw):
            byte = raw[i]
            if quote is None and byte in WHITESPACE:
                break
            if byte == ord("\\"):
                char, i = _cunescape_one(raw, i + 1)
                word += char
            elif quote is None and byte in b"\"'":
                quote, regions, i = byte, regions + 1, i + 1
            elif byte == quote:
                quote, i = None, i + 1
            else:
                word.append(byte)
                i += 1
        if quote is not None:
            raise Refused("an unterminated quote")
        words.append((bytes(word), regions))


def resolve(word: str, mark: str) -> str:
    """``%%`` -> ``%`` (specifiers, systemd.unit(5)) or ``$$`` -> ``$`` (systemd.service(5) at exec)."""
    out, i = [], 0
    while i < len(word):
        if word[i] == mark:
            if word[i + 1 : i + 2] != mark:
                raise Refused(f"an unescaped {mark} would be expanded: {word!r}")
            i += 1
        out.append(word[i])
        i += 1
    return "".join(out)


def exec_argv(line: str) -> list[str]:
    """The argv a process gets from an ExecStart= line: words, then specifiers, then $ at exec."""
    argv = [resolve(resolve(_utf8(word), "%"), "$") for word, _ in systemd_words(line)]
    # Older systemd resolved the specifiers of the whole line before splitting it: the same argv.
    assert [resolve(_utf8(word), "$") for word, _ in systemd_words(resolve(line, "%"))] == argv
    return argv


def _utf8(word: bytes) -> str:
    try:
        return word.decode()
    except UnicodeDecodeError as exc:
        raise Refused("not UTF-8") from exc


def unquote_word(quoted: str) -> str:
    """The one argument a quote_arg() word is, checked to be one double-quoted word."""
    assert quoted.startswith('"') and quoted.endswith('"') and len(quoted) >= 2, quoted
    [(_, regions)] = systemd_words(quoted)
    assert regions == 1, f"an unescaped quote inside {quoted!r}"
    [arg] = exec_argv(quoted)
    return arg


NON_ASCII = ["\u00e9", "\u00df", "\u00a0", "\u0085", "\u2028", "\u4e2d", "\U0001f600", "\u212a", "\ufeff"]
ALPHABET = [*(chr(c) for c in range(1, 128)), *NON_ASCII]
HEAVY = [*"\\\"$%; \t\n'{}", "$CELERY_APP", "${X}", "%i", "%%", "\\x41"]


def test_the_reference_reads_systemds_own_examples():
    # systemd.service(5), "Command lines", and systemd.syntax(7), "Quoting".
    assert exec_argv('/bin/echo "one two" three\\x20 "a\\"b" \'c d\' %%i $$HOME') == [
        "/bin/echo",
        "one two",
        "three ",
        'a"b',
        "c d",
        "%i",
        "$HOME",
    ]
    assert exec_argv('"a"b"c"') == ["abc"]
    for refused in ('"open', "a %i", "$HOME", "${HOME}", "a ; b", '"\\x00"', '"\\q"', "a\x01b"):
        with pytest.raises(Refused):
            exec_argv(refused)


@pytest.mark.parametrize("char", [chr(c) for c in range(1, 128)] + NON_ASCII, ids=lambda c: f"U+{ord(c):04X}")
def test_every_character_survives_quoting(char):
    for arg in (char, char * 3, f"a{char}b", f"{char} {char}"):
        quoted = systemd.quote_arg(arg)
        assert unquote_word(quoted) == arg
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in quoted), quoted


def test_the_empty_argument_stays_an_argument():
    assert systemd.quote_arg("") == '""'
    assert exec_argv(systemd.exec_command(["/bin/x", "", "y"])) == ["/bin/x", "", "y"]


def test_a_nul_cannot_be_an_argument():
    # No argv element can hold NUL, and systemd refuses \x00: the plan refuses control characters first.
    with pytest.raises(Refused):
        unquote_word(systemd.quote_arg("a\x00b"))
    entry = {"name": "w", "queues": ["q"], "extra_args": ["a\x00b"], "env": {"X": "a\x00b"}}
    plan = workers_plugin.celery_worker_plan([entry], DEFAULTS, {"app": "demo_app"})
    assert any("extra_args" in e and "control character" in e for e in plan["errors"]), plan["errors"]


def test_random_strings_survive_quoting():
    rng = random.Random(20240611)
    for _ in range(3000):
        pool = ALPHABET if rng.random() < 0.5 else ALPHABET + HEAVY * 8
        arg = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert unquote_word(systemd.quote_arg(arg)) == arg, repr(arg)


def test_a_command_line_passes_each_argument_unchanged():
    rng = random.Random(7)
    for _ in range(500):
        argv = ["/opt/celery-fleet/venv/bin/celery"] + [
            "".join(rng.choice(ALPHABET + HEAVY) for _ in range(rng.randint(0, 12)))
            for _ in range(rng.randint(0, 6))
        ]
        assert exec_argv(systemd.exec_command(argv)) == argv, argv
        assert exec_argv(fleet_filters.systemd_exec(argv)) == argv
    assert exec_argv(systemd.exec_command(["/bin/x", ";", "y", 5])) == ["/bin/x", ";", "y", "5"]


# What the fleet owns ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_cli() -> dict:
    """What the installed Celery's command line reads, as celery_fleet.cli_report finds it."""
    return cli_report.report([])


def _random_names(rng: random.Random, prefix: str, count: int = 200) -> list[str]:
    tail = string.ascii_letters + string.digits + "_"
    return [prefix + "".join(rng.choice(tail) for _ in range(rng.randint(0, 16))) for _ in range(count)]


def test_every_celery_and_flower_variable_is_the_fleets(celery_cli):
    rng = random.Random(5)
    read = [v for v in celery_cli["envvars"] if v.startswith("CELERY_")]
    assert "CELERY_WORKER_BEAT" in read
    flower = ["FLOWER_" + option.upper() for option in ownership.FLOWER_OWNED]
    names = [
        *read,
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
        "CELERY_WORKER_BEAT",
        "CELERY_",
        *flower,
        "FLOWER_",
        *_random_names(rng, "CELERY_"),
        *_random_names(rng, "FLOWER_"),
    ]
    names += [casing for known in ("CELERY_APP", "FLOWER_PORT") for casing in casings(known)]
    for name in names:
        assert ownership.env_owner(name), name


@pytest.mark.parametrize("name", sorted(ownership.UNIT_ENV))
def test_the_gpu_pinning_variables_are_the_units(name):
    assert name.startswith("CUDA_")
    assert "gpus" in ownership.env_owner(name)


def test_ordinary_variables_are_the_users():
    rng = random.Random(11)
    names = [
        "PATH",
        "HOME",
        "LANG",
        "PYTHONPATH",
        "HF_HOME",
        "MODEL_MAX_MEMORY_GB",
        "CUDA_HOME",
        "CELERY",
        "CELERYD_OPTS",
        "MY_CELERY_SETTING",
        "FLOWER",
        "FLOWERS_X",
        "_CELERY_X",
        *workers_plugin.THREAD_CAP_VARS,
    ]
    alphabet = string.ascii_uppercase + string.digits + "_"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(2000)]
    for name in names:
        if not ownership.ENV_NAME.match(name) or name in ownership.UNIT_ENV:
            continue
        if name.upper().startswith(("CELERY_", "FLOWER_")):
            continue
        assert ownership.env_owner(name) is None, name


def _options(name: str) -> set[str]:
    group = cli_report.celery_context()
    command = group.command.get_command(group, name)
    ctx = cli_report.sub_context(group, command, name)
    help_option = command.get_help_option(ctx)
    return {
        p.name
        for p in command.get_params(ctx)
        if isinstance(p, click.Option) and p is not help_option and p.name
    }


def test_every_option_of_celery_worker_is_judged_exactly_once():
    judged = [ownership.WORKER_FIELDS, ownership.WORKER_BEAT, ownership.WORKER_UNIT, ownership.WORKER_ALLOWED]
    names = [name for kind in judged for name in kind]
    assert len(names) == len(set(names)), "an option is judged twice"
    assert set(names) == _options("worker")
    assert set(ownership.WORKER_FIELDS.values()) <= set(DEFAULTS) | {"name", "queues"}


def test_every_option_of_celery_beat_is_judged_exactly_once():
    assert not set(ownership.BEAT_OWNED) & set(ownership.BEAT_ALLOWED)
    assert set(ownership.BEAT_OWNED) | set(ownership.BEAT_ALLOWED) == _options("beat")
