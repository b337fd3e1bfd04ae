"""`kdcache init DIR`: a project folder of one's own, driven by the installed kdcache (no repository needed).

DIR/Makefile includes the stage graph that ships inside the package (pipeline/stages.mk; the repository's Makefile
includes the same file), located by asking kdcache, so the rules always match the kdcache they run. DIR/kdcache.yaml
is every config section with its defaults and what each field does, generated from the config dataclasses and
the comments beside their fields in pipeline/config.py, so it cannot fall behind them.
"""
from __future__ import annotations

import dataclasses
import io
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml

from kdcache.pipeline.config import _SECTION_TYPES, Config
from kdcache.pipeline.errors import KdcacheError

RULES = Path(__file__).with_name("stages.mk")  # package data (pyproject.toml: tool.setuptools.package-data)
CONFIG_NAME = "kdcache.yaml"
WIDTH = 110

MAKEFILE = """\
# A kdcache project, written by `kdcache init`. `make evaluate` runs prepare -> precompute -> train -> evaluate on
# {config}, each stage only when something it depends on changed (`make -n evaluate` shows the plan); `make help`
# lists the targets. The stage graph comes from the installed kdcache (its stages.mk).
# Variables: CONFIG (the YAML; its run_dir is the run folder), RUN (another run folder), ARGS (extra
# `-s section.field=value` overrides), OVERWRITE=1 (let a stage replace what other settings made: without it such a
# stage stops and says what changed), ASSISTANT=1 (learn through a MiniDisc teacher assistant).
# PYTHON: the Python environment kdcache is installed in (the one that ran `kdcache init`).
PYTHON ?= {python}
CONFIG ?= {config}
.DEFAULT_GOAL := help
KDCACHE_MK := $(shell $(PYTHON) -m kdcache.pipeline.make makefile)
ifeq ($(KDCACHE_MK),)
$(error kdcache is not installed for PYTHON=$(PYTHON): pip install it there, or run make PYTHON=/path/to/python)
endif
include $(KDCACHE_MK)
"""


def field_comments(cls) -> dict[str, list[str]]:
    """field name -> what pipeline/config.py says of it: the comment block just above the field, then its trailing
    comment with the comment lines that continue it (indented under it), each block as one paragraph."""
    import inspect

    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)}
    lines = source.splitlines()
    out: dict[str, list[str]] = {}
    above: list[str] = []
    last = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if number not in code_lines:
            if number in comments:
                indent = len(line) - len(line.lstrip())
                if last is not None and indent > 4 and not above:  # continues the trailing comment above it
                    out[last][-1] += " " + comments[number]
                else:
                    above.append(comments[number])
            else:
                above, last = [], None  # a blank line ends a comment block
            continue
        name = stripped.split(":", 1)[0]
        if name in names and line.startswith("    ") and not line.startswith("     "):
            out[name] = ([" ".join(above)] if above else []) + ([comments[number]] if number in comments else [])
            last = name
        else:
            last = None
        above = []
    return out


def _value(name: str, value, indent: str) -> list[str]:
    """`name: value` as YAML lines."""
    text = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False, width=WIDTH)
    return [indent + line for line in text.splitlines()]


def _comment(paragraphs: list[str], indent: str) -> list[str]:
    width = WIDTH - len(indent) - 2
    return [f"{indent}# {line}" for text in paragraphs for line in textwrap.wrap(text, width)]


def section_help(name: str) -> list[str]:
    """What a section is for: the help of the command of the same name (`kdcache prepare --help`, ...)."""
    from kdcache.pipeline.cli import cli

    text = " ".join((cli.commands[name].help or "").split("\n\n")[0].split())
    return [f"{name}: {text}"]


def config_template() -> str:
    """A YAML config with every section and field at its default, each field with what it does (commented)."""
    default = Config()
    out = _comment([
        "kdcache config, written by `kdcache init`: every section with its defaults and what each field does. "
        "A field left out keeps its default, so delete what you do not change if you like. Relative paths "
        "(dataset, teacher, run_dir) are read from this project's folder when make runs kdcache here."], "")
    out += ["", *_comment(field_comments(Config).get("run_dir", []), ""), *_value("run_dir", default.run_dir, "")]
    for name, cls in _SECTION_TYPES.items():
        comments = field_comments(cls)
        section = getattr(default, name)
        out += ["", *_comment(section_help(name), ""), f"{name}:"]
        for f in dataclasses.fields(cls):
            out += [*_comment(comments.get(f.name, []), "  "), *_value(f.name, getattr(section, f.name), "  ")]
    return "\n".join(out) + "\n"


def init_project(directory: Path, overwrite: bool = False) -> list[Path]:
    """Write DIRECTORY/Makefile and DIRECTORY/kdcache.yaml; an existing one is replaced only with `overwrite`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise KdcacheError(f"{directory} exists and is not a folder: choose another name for the project")
    files = {directory / "Makefile": MAKEFILE.format(python=sys.executable, config=CONFIG_NAME),
             directory / CONFIG_NAME: config_template()}
    existing = [str(path) for path in files if path.exists()]
    if existing and not overwrite:
        raise KdcacheError(f"{' and '.join(existing)} already exist: pass --overwrite to replace them, or choose "
                           "another folder")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return list(files)
