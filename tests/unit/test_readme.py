"""The README's CLI reference is the CLI's own help (regenerate with `make docs`)."""
from pathlib import Path

from kdcache.pipeline.clidoc import cli_reference, readme_section

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_cli_reference_matches_the_cli():
    assert readme_section(README.read_text()) == cli_reference().strip("\n"), \
        "README.md's CLI reference is stale: run `make docs`"


def test_every_command_is_documented():
    from kdcache.pipeline.cli import cli

    section = readme_section(README.read_text())
    for name in cli.commands:
        assert f"#### `kdcache {name}`" in section
