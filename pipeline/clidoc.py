"""The README's CLI reference, generated from the click help texts (`make docs` rewrites it; a test keeps it in sync)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def cli_reference() -> str:
    """The output of `kdcache --help` and of every `kdcache COMMAND --help`, as Markdown (hidden commands, the
    Makefile's helpers, left out as --help leaves them out)."""
    from click.testing import CliRunner

    from kdcache.pipeline.cli import cli

    runner = CliRunner()
    parts = []
    visible = [name for name in cli.list_commands(click.Context(cli)) if not cli.commands[name].hidden]
    for name in [None, *visible]:
        args = ["--help"] if name is None else [name, "--help"]
        result = runner.invoke(cli, args, prog_name="kdcache", terminal_width=100)
        if result.exit_code != 0:
            raise RuntimeError(f"kdcache {' '.join(args)} failed: {result.output}")
        path = "kdcache" if name is None else f"kdcache {name}"
        parts.append(f"#### `{path}`\n\n```text\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


def write(readme_path: Path) -> None:
    text = readme_path.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme_path.write_text(f"{head}{START}\n{cli_reference()}\n{END}{tail}")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
