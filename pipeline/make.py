"""`python -m kdcache.pipeline.make COMMAND ...`: the kdcache commands that make runs while it reads a Makefile
(`run-dir`, `stamps`, `makefile`). They are the same click commands as `kdcache COMMAND`, run without the main
entry's imports of transformers and the storage backends, which cost ~1.5 s each time make reads a Makefile."""
from __future__ import annotations

import sys

import click

from kdcache.pipeline.errors import KdcacheError

COMMANDS = ("run-dir", "stamps", "makefile")


def main(argv: list[str] | None = None) -> int:
    from kdcache.pipeline.cli import cli

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        click.echo(f"kdcache.pipeline.make: the first argument is one of {', '.join(COMMANDS)}", err=True)
        return 2
    try:
        cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except KdcacheError as e:
        click.echo(f"kdcache: error: {e}", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
