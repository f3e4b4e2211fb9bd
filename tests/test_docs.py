"""The docs cannot rot: every `edgetl ...` command quoted in README.md and docs/*.md parses against
the real CLI (the command exists, every option exists and takes that value, nothing is missing).

The commands name the user's data and devices (`my-images/`, `--source 0`), so they are parsed, not
run: click's own parser checks each one with the command's real parameters (`make_context`, no
callback runs). What runs for real is covered elsewhere: `make demo` runs the demo's commands, the
CLI tests run every command on tiny data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from edgetl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


def quoted_commands(page: Path) -> list[tuple[int, str]]:
    """``(line number, command)`` of each `edgetl` command in the page's shell code blocks
    (continuation lines joined, comments and prompts stripped)."""
    out: list[tuple[int, str]] = []
    in_block, shell, pending, start = False, False, "", 0
    for no, raw in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(raw.strip())
        if m:
            in_block, shell = not in_block, m.group(1) in ("bash", "sh", "shell", "console", "")
            continue
        if not (in_block and shell):
            continue
        line = _strip_comment(raw.strip())
        line = line[2:] if line.startswith("$ ") else line
        if pending:
            line, start = pending + " " + line, start
        else:
            start = no
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        for part in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
            part = part.strip()
            if re.match(r"^(\w+=\S+\s+)*edgetl(\s|$)", part):  # VAR=value edgetl ...
                words = shlex.split(part)
                while re.match(r"^\w+=", words[0]):
                    words = words[1:]
                out.append((start, shlex.join(words[1:])))
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


ALL = [(page, no, cmd) for page in PAGES for no, cmd in quoted_commands(page)]


def test_the_docs_quote_commands():
    assert len(ALL) >= 40  # the pages are full of them; a parser that finds none would pass everything
    assert {p.name for p, _, _ in ALL} >= {"README.md", "training.md", "runtime.md", "targets.md", "detection.md"}


@pytest.mark.parametrize("page,no,cmd", ALL, ids=[f"{p.name}:{n}" for p, n, _ in ALL])
def test_quoted_command_parses(page, no, cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the paths a command needs to exist are made here, empty
    args = shlex.split(cmd)
    ctx = click.Context(cli, info_name="edgetl")
    group_args = []
    while args and args[0].startswith("--"):  # group options (--verbose, --debug)
        group_args.append(args.pop(0))
    if not args:
        return
    name, rest = args[0], args[1:]
    command = cli.get_command(ctx, name)
    assert command is not None, f"{page.name}:{no}: `edgetl {name}` is not a command"
    if "--help" in rest or "-h" in rest:
        return
    for _ in range(5):
        try:
            _parse(command, name, rest)
            return
        except click.BadParameter as exc:  # an input that must exist: the user's file or folder
            m = re.search(r"'([^']+)' does not exist", exc.format_message())
            if not m:
                pytest.fail(f"{page.name}:{no}: `edgetl {cmd}`: {exc.format_message()}")
            p = tmp_path / m.group(1)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch() if p.suffix else p.mkdir()
        except click.UsageError as exc:
            pytest.fail(f"{page.name}:{no}: `edgetl {cmd}`: {exc.format_message()}")


def _parse(command: click.Command, name: str, args: list[str]) -> None:
    """click's parse of ``args`` for ``command`` (a group: its sub-command too), no callback run."""
    if isinstance(command, click.Group):  # a group's options, then its sub-command and the rest
        parser = command.make_parser(click.Context(command, info_name=name))
        _, rest, _ = parser.parse_args(list(args))
        if not rest:
            assert command.invoke_without_command, f"`{name}` needs a sub-command"
            return
        sub_args = rest
        sub = command.get_command(click.Context(command, info_name=name), sub_args[0])
        assert sub is not None, f"`{name} {sub_args[0]}` is not a command"
        _parse(sub, sub_args[0], sub_args[1:])
        return
    command.make_context(name, list(args))


def test_a_wrong_quote_is_caught():
    """The check itself: an unknown option, a bad choice and a missing argument fail it."""
    ctx = click.Context(cli, info_name="edgetl")
    for name, args in (("train", ["data", "--nosuch-option"]), ("compile", ["runs/x", "--method", "nosuch"]),
                       ("run", [])):
        with pytest.raises(click.UsageError):
            _parse(cli.get_command(ctx, name), name, args)
