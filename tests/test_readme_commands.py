"""Every command the README names (in its text and in its code blocks), and bench's own
documents (bench/README.md, and bench/RESULTS.md, which keeps every measured run), uses
subcommands and flags its program has: `quotad`, `quotactl` and the `bench` modules. A command in the text
may leave out what it does not talk about (a file, an id), so its words are checked, not run:
each subcommand must be one of its parser's, each `--flag` one of the parser it is given to
(argparse takes a program's own flags before its subcommand, a subcommand's after it), each
flag that takes no value given none."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator

import pytest

from test_readme import README, ROOT

BENCH_DOCUMENTS = ("bench/README.md", "bench/RESULTS.md")

NOT_COMMANDS = {"quotad user token v1"}  # the message a user token's HMAC signs
COMMAND_START = re.compile(
    r"^(?:\.venv/bin/)?(?:python3? -m (?P<module>bench(?:\.\w+)?|quotad(?:_client\.ctl)?)"
    r"|(?P<program>quotactl|quotad)(?= |$))")


def readme_commands(text: str = README) -> list[str]:
    """Each command, whitespace collapsed: inline `code` that starts with a program, and the
    lines of fenced blocks that do (a trailing backslash joins the next line)."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```$", text, re.S | re.M):  # any language
        joined = re.sub(r"\\\n\s*", " ", block)
        commands.extend(line.split(" #")[0].strip() for line in joined.splitlines())
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", inline):
        commands.extend(part.strip() for part in " ".join(span.split()).split("&&"))
    return sorted({command for command in commands
                   if COMMAND_START.match(command) and command not in NOT_COMMANDS})


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def bench_parser(module: str) -> argparse.ArgumentParser:
    """The parser a bench module's main() builds, caught as it begins to parse."""
    def caught(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parser(self)

    main = importlib.import_module(module if module != "bench" else "bench.harness").main
    saved = argparse.ArgumentParser.parse_args, sys.argv
    argparse.ArgumentParser.parse_args = caught  # type: ignore[method-assign]
    sys.argv = [module]
    try:
        main()
    except _Parser as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = saved
    raise AssertionError(f"{module}'s main() parsed no arguments")


def program_parser(command: str) -> tuple[argparse.ArgumentParser, list[str]]:
    found = COMMAND_START.match(command)
    assert found is not None, command
    name = found["module"] or found["program"]
    words = command[found.end():].split()
    if name in ("quotactl", "quotad_client.ctl"):
        from quotad_client import ctl
        return ctl.parser(), ctl.cluster_target_as_flags(words)
    if name == "quotad":
        from quotad import cli
        return cli.parser(), words
    return bench_parser(name), words


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def _positionals_max(parser: argparse.ArgumentParser) -> float:
    counts = {None: 1, "?": 1, "*": float("inf"), "+": float("inf")}
    return sum(counts.get(action.nargs, action.nargs) for action in parser._actions
               if not action.option_strings
               and not isinstance(action, argparse._SubParsersAction))


def problems(parser: argparse.ArgumentParser, words: list[str]) -> Iterator[str]:
    """What in words the parser does not have: each flag looked up in the parser of the
    last subcommand named before it (or the program's). "..." stands for words left out."""
    options = _options(parser)
    subcommands = _subcommands(parser)
    positionals, positionals_max = 0, _positionals_max(parser)
    expects_value = False
    for word in words:
        if expects_value or word == "...":
            expects_value = False
            continue
        if word.startswith("--"):
            flag, has_value = word.split("=", 1)[0], "=" in word
            action = options.get(flag)
            if action is None:
                yield f"no flag {flag}"
                expects_value = not has_value  # its value, if any, is no positional
                continue
            takes_value = action.nargs != 0
            if not takes_value and has_value:
                yield f"{flag} takes no value"
            expects_value = takes_value and not has_value
        elif subcommands:
            if word not in subcommands:
                yield f"no subcommand {word!r} (there are {sorted(subcommands)})"
                return
            parser = subcommands[word]
            options = _options(parser)
            subcommands = _subcommands(parser)
            positionals, positionals_max = 0, _positionals_max(parser)
        else:
            positionals += 1
            if positionals > positionals_max:
                yield f"{word!r}: more words than the command takes"


COMMANDS = readme_commands()
BENCH_COMMANDS = sorted({command for name in BENCH_DOCUMENTS for command in
                         readme_commands((ROOT / name).read_text(encoding="utf-8"))}
                        - set(COMMANDS))


def test_the_readme_names_commands_of_every_program():
    programs = {(found["module"] or found["program"]).split(".")[0]
                for found in map(COMMAND_START.match, COMMANDS) if found}
    assert {"bench", "quotad", "quotactl"} <= programs, programs
    assert len(COMMANDS) >= 40, COMMANDS


def test_benchs_documents_name_commands_of_its_modules():
    modules = {found["module"] for found in map(COMMAND_START.match, BENCH_COMMANDS) if found}
    assert {"bench", "bench.batch", "bench.recovery", "bench.unary", "bench.overload",
            "bench.soak"} <= modules, modules


@pytest.mark.parametrize("command", COMMANDS + BENCH_COMMANDS)
def test_a_command_the_readme_names_uses_what_its_program_has(command):
    parser, words = program_parser(command)
    assert list(problems(parser, words)) == [], command


def test_a_wrong_flag_subcommand_or_word_is_caught():
    from quotad_client import ctl
    assert list(problems(ctl.parser(), ["--cluster", "export"])) == []
    assert list(problems(ctl.parser(), ["export", "--cluster"])) == ["no flag --cluster"]
    assert list(problems(ctl.parser(), ["subscriptions", "list"])) == [
        "'list': more words than the command takes"]
    assert list(problems(ctl.parser(), ["plans", "list", "--jsn"])) == ["no flag --jsn"]
    assert list(problems(ctl.parser(), ["plan", "list"]))[0].startswith("no subcommand 'plan'")
    assert list(problems(ctl.parser(), ["plans", "list", "--json=yes"])) == [
        "--json takes no value"]
    assert list(problems(bench_parser("bench.fsync"), ["--record", "1"])) == [
        "no flag --record"]
