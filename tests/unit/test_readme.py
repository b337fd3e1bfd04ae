"""The README's CLI reference is the CLI's own help (regenerate with `make docs`)."""
from pathlib import Path

from kdcache.pipeline.clidoc import END, START, cli_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section(readme: str) -> str:
    """The part of README.md between the cli-reference markers."""
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} section")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def test_readme_cli_reference_matches_the_cli():
    assert readme_section(README.read_text()) == cli_reference().strip("\n"), \
        "README.md's CLI reference is stale: run `make docs`"


def test_every_command_is_documented_and_no_hidden_one():
    from kdcache.pipeline.cli import cli

    section = readme_section(README.read_text())
    hidden = [name for name, command in cli.commands.items() if command.hidden]
    assert {"stamps", "run-dir", "makefile"} <= set(hidden)        # the Makefile's helpers: not for users
    for name, command in cli.commands.items():
        assert (f"#### `kdcache {name}`" in section) != command.hidden, name
        assert (f"\n  {name} " in section.split("#### `kdcache ")[0]) != command.hidden, name  # `kdcache --help`


def test_the_internal_stamps_command_is_hidden_from_help_and_reference():
    from click.testing import CliRunner

    from kdcache.pipeline.cli import cli

    shown = CliRunner().invoke(cli, ["--help"]).output
    assert "stamps" not in shown and "report" in shown
    assert "kdcache stamps" not in cli_reference()
    assert CliRunner().invoke(cli, ["stamps", "--help"]).exit_code == 0  # still there for the Makefile


def test_the_bad_input_table_lists_every_case_of_the_matrix_and_its_count():
    """The README's Reliability section quotes the bad-input matrix of tests/reliability/test_bad_input.py: one row
    per case, and the count in the summary table is the number of cases."""
    import re

    matrix = (README.parent / "tests" / "reliability" / "test_bad_input.py").read_text()
    cases = re.findall(r'id="([^"]+)"', matrix)
    text = README.read_text()
    table = text.split("| case | command |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:] if line.startswith("|")]
    assert sorted(rows) == sorted(cases)
    assert f"| bad inputs tried (one line, exit code 2, no traceback each) | {len(cases)} " in text
    assert f"bad inputs tried {len(cases)}," in text
