"""``--help`` of every command line: each option says what it does and shows its default,
in plain text (no reST or Markdown backticks).

The options and their defaults come from the parsers the commands really use
(``cli.build_parser()`` for ``rpycsvc`` and every subcommand, ``cli.add_serve_arguments`` for
``rpycsvc_classic``); the text checked is what the command prints, run as a subprocess.
``serve``'s options default to None in argparse (so ``RPYCSVC_*`` variables can fill them),
so their help must show :class:`rpycsvc.server.config.ServerConfig`'s default instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from rpycsvc.cli import main as cli
from rpycsvc.server.config import ServerConfig
from tests.support.servers import REPO

WAIT = 60.0
#: subcommands that must exist (any other that build_parser() has is walked too)
EXPECTED = {"serve", "deploy", "status", "top", "demo", "registry", "bench", "repl"}
#: raw markup that --help would show as written: any backtick, Sphinx roles
MARKUP = re.compile(r"`|:(?:func|class|meth|data|mod|attr|exc|obj|ref|doc):")
#: the heading of the first option/positional section: the description ends above it
FIRST_SECTION = re.compile(r"^(?:positional arguments|options|optional arguments):$", re.M)
#: the serve options' built-in defaults, by dest (the dataclass after __post_init__)
SERVE_DEFAULTS = {f.name: getattr(ServerConfig(), f.name) for f in dataclasses.fields(ServerConfig)}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """``rpycsvc``'s subcommands, name -> parser, as ``rpycsvc`` itself builds them."""
    for action in cli.build_parser()._actions:
        if isinstance(action.choices, dict):  # the subparsers action: name -> parser
            return dict(action.choices)
    raise AssertionError("rpycsvc's parser has no subcommands")


def classic_parser() -> argparse.ArgumentParser:
    """What ``cli.classic_main`` parses with."""
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    return parser


def help_text(*argv: str) -> str:
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                         timeout=WAIT, cwd=str(REPO), stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout


def entries(text: str) -> dict[str, str]:
    """Each argument's help in ``--help`` output: its first name or metavar -> help text
    (whitespace normalized; "" when the entry has none)."""
    match = FIRST_SECTION.search(text)
    assert match, text
    found: dict[str, list[str]] = {}
    current: list[str] = []  # the words of the help being read
    # An entry starts at a line indented by exactly two spaces; its help follows the
    # invocation after two spaces or more, and goes on in the more deeply indented lines
    # below. A blank line or a section heading ("options:") ends it.
    for line in text[match.start():].splitlines():
        if re.match(r"  \S", line):
            invocation, _, first = line.strip().partition("  ")
            current = found.setdefault(re.split(r"[ ,]", invocation, maxsplit=1)[0], [])
            current.extend(first.split())
        elif line.startswith("   "):
            current.extend(line.split())
        else:
            current = []
    return {name: " ".join(words) for name, words in found.items()}


def shown(value: Any) -> list[str]:
    """How a default may be written in help: 10.0 as 10 too, 2 << 30 bytes as 2G."""
    if isinstance(value, float) and value.is_integer():
        return [str(value), str(int(value))]
    if isinstance(value, int) and value and value % (1 << 20) == 0:
        return [str(value), f"{value >> 20}M"] + ([f"{value >> 30}G"] if value % (1 << 30) == 0
                                                  else [])
    return [str(value)]


def assert_no_markup(text: str) -> None:
    bad = [line for line in text.splitlines() if MARKUP.search(line)]
    assert not bad, "raw markup (backticks, reST roles) in --help:\n" + "\n".join(bad)


def check_help(text: str, parser: argparse.ArgumentParser,
               defaults: dict[str, Any] | None = None) -> None:
    """Every argument of ``parser`` has help in ``text``; every option's help says its default,
    and a default that is a value (not None, a flag's True/False, or nothing) is shown."""
    assert_no_markup(text)
    helps = entries(text)
    problems: list[str] = []
    for action in parser._actions:
        if action.default == argparse.SUPPRESS or isinstance(action.choices, dict):
            continue  # -h/--help, --version; subcommands are checked by their own help
        name = action.option_strings[0] if action.option_strings else str(action.metavar
                                                                           or action.dest)
        help_ = helps.get(name)
        if help_ is None:
            problems.append(f"{name}: not in --help")
            continue
        if not help_:
            problems.append(f"{name}: no help text")
            continue
        if not action.option_strings:
            continue  # a positional: what it is suffices
        if "default" not in help_:
            problems.append(f"{name}: help doesn't say the default: {help_!r}")
            continue
        default = action.default
        if default is None and defaults is not None:
            default = defaults.get(action.dest)
        if default is None or isinstance(default, bool) or default in ("", [], ()):
            continue
        values = "|".join(re.escape(v) for v in shown(default))
        if not re.search(rf"\bdefault:? (?:{values})(?![\w.])", help_):
            problems.append(f"{name}: help doesn't show the default {default!r}: {help_!r}")
    assert not problems, "\n".join(problems)


SUBCOMMANDS = sorted(subcommand_parsers())


def test_every_subcommand_is_walked() -> None:
    assert set(SUBCOMMANDS) >= EXPECTED, SUBCOMMANDS


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    text = help_text("-m", "rpycsvc.cli", command)
    check_help(text, subcommand_parsers()[command],
               SERVE_DEFAULTS if command == "serve" else None)


def test_rpycsvc_classic_help() -> None:
    check_help(help_text(str(REPO / "bin" / "rpycsvc_classic")), classic_parser(),
               SERVE_DEFAULTS)


def test_top_level_help_lists_every_subcommand_with_a_summary() -> None:
    text = help_text("-m", "rpycsvc.cli")
    assert_no_markup(text)
    for command in SUBCOMMANDS:
        assert re.search(rf"^    {command}\s+\S", text, re.M), (command, text)


def test_the_checker_notices_what_it_looks_for() -> None:
    """check_help fails on each kind of gap it is there to find (so the tests above can fail)."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "no help text"),
        ({"default": 3, "help": "how many"}, "doesn't say the default"),
        ({"default": 3, "help": "how many (default: 4)"}, "doesn't show the default 3"),
        ({"default": 2.0, "help": "seconds (default: 20)"}, "doesn't show the default 2.0"),
        ({"default": 3, "help": "``how`` many (default: 3)"}, "`"),
    ]
    for kwargs, expect in cases:
        parser = argparse.ArgumentParser(prog="x")
        parser.add_argument("--count", **kwargs)
        with pytest.raises(AssertionError, match=re.escape(expect)):
            check_help(parser.format_help(), parser)
    # an option without help at the end of a group, another group below it
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument_group("first").add_argument("--bare", default=1)
    parser.add_argument_group("second").add_argument("--other", default=1, help="(default: 1)")
    with pytest.raises(AssertionError, match="--bare: no help text"):
        check_help(parser.format_help(), parser)
    # and accepts what it should: defaults shown, flags saying theirs, config defaults
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--count", type=float, default=2.0, help="seconds (default: 2)")
    parser.add_argument("--flag", action="store_true", help="do it (default: off)")
    parser.add_argument("--grace", default=None, help="seconds (default: 10)")
    parser.add_argument("--max-message-size", default=None,
                        help="a very long explanation that wraps over more than one line of "
                        "the help output (default: 2G)")
    check_help(parser.format_help(), parser, SERVE_DEFAULTS)
    parser.add_argument("--threads", default=None, help="tasks at once (default: 25)")
    with pytest.raises(AssertionError, match="--threads: help doesn't show the default 256"):
        check_help(parser.format_help(), parser, SERVE_DEFAULTS)
