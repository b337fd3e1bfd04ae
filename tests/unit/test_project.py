"""`kdcache init`: the commented config generated from the config dataclasses, the project's Makefile, and the
Makefile's fast helpers (`python -m kdcache.pipeline.make`)."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import yaml

from kdcache.pipeline.cli import cli, main
from kdcache.pipeline.config import _SECTION_TYPES, Config, PrecomputeConfig, config_from_dict
from kdcache.pipeline.project import CONFIG_NAME, RULES, config_template, field_comments


def test_config_template_is_every_default_and_loads_back_to_them():
    data = yaml.safe_load(config_template())
    assert data == Config().to_dict()                       # every section, every field, at its default
    assert config_from_dict(data) == Config()


def test_every_field_of_the_template_says_what_it_does():
    """A field added to pipeline/config.py without a comment beside it fails here (its comment is its doc)."""
    lines = config_template().splitlines()
    assert lines[lines.index("run_dir: runs/default") - 1].startswith("# the run folder")
    for name, cls in _SECTION_TYPES.items():
        start = lines.index(f"{name}:")
        first = start - 1
        while lines[first - 1].startswith("#"):
            first -= 1
        assert lines[first].startswith(f"# {name}: "), name      # what the section is for: its command's help
        for f in dataclasses.fields(cls):
            at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {f.name}:"))
            assert lines[at - 1].startswith("  # "), f"{name}.{f.name} has no comment in pipeline/config.py"


def test_field_comments_are_the_comments_beside_the_fields_in_config_py():
    comments = field_comments(PrecomputeConfig)
    assert comments["k"] == ["top-k support size per position (topk, hybrid)"]
    assert comments["draws"] == ["how N draws are made (sample, hybrid): systematic (N evenly spaced quantiles, "
                                 "one uniform per position: unbiased, low variance) | iid (RS-KD's draws)"]
    above, trailing = comments["signal"]                    # a block above the field, then its own comment
    assert above.startswith("what is cached per position;") and above.endswith("use signal topk (k 16) or hybrid")
    assert trailing.startswith("sample (N draws, RS-KD) | topk")
    assert "precompute: " + " ".join(cli.commands["precompute"].help.split()) in " ".join(
        config_template().replace("\n# ", " ").split())


def test_init_writes_a_makefile_and_a_config_and_replaces_them_only_with_overwrite(tmp_path, capsys):
    project = tmp_path / "proj"
    assert main(["init", str(project)]) == 0
    makefile = (project / "Makefile").read_text()
    assert f"PYTHON ?= {sys.executable}\n" in makefile      # the environment this kdcache is installed in
    assert f"CONFIG ?= {CONFIG_NAME}\n" in makefile
    assert "include $(KDCACHE_MK)" in makefile and "kdcache.pipeline.make makefile" in makefile
    assert (project / CONFIG_NAME).read_text() == config_template()
    assert f"cd {project}" in capsys.readouterr().out

    (project / CONFIG_NAME).write_text("run_dir: runs/mine\n")
    assert main(["init", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exist: pass --overwrite" in err
    assert (project / CONFIG_NAME).read_text() == "run_dir: runs/mine\n"     # nothing replaced
    assert main(["init", str(project), "--overwrite"]) == 0
    assert (project / CONFIG_NAME).read_text() == config_template()

    (tmp_path / "a-file").write_text("")
    assert main(["init", str(tmp_path / "a-file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_make_helpers_print_the_run_folder_and_the_rules(tmp_path, capsys, monkeypatch):
    from kdcache.pipeline.make import main as make_main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("run_dir: runs/from-yaml\n")
    assert make_main(["run-dir", "-c", str(config)]) == 0
    assert make_main(["run-dir", "-c", str(config), "-s", "run_dir=runs/from-s"]) == 0
    assert make_main(["run-dir", "-c", str(config), "--run-dir", "runs/given", "--trust-remote-code"]) == 0
    # the YAML's run_dir is read from the YAML's folder, -s and --run-dir from the current one
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "runs/from-yaml"), "runs/from-s", "runs/given"]
    assert list(tmp_path.iterdir()) == [config]             # it only reads
    assert make_main(["makefile"]) == 0
    assert Path(capsys.readouterr().out.strip()) == RULES and RULES.exists()
    assert make_main(["run-dir", "-s", "train.lr=-1"]) == 2
    assert capsys.readouterr().err == "kdcache: error: invalid config: train.lr must be > 0, got -1.0\n"
    assert make_main(["train"]) == 2                         # only the Makefile's helpers run this way
    assert "one of run-dir, stamps, makefile" in capsys.readouterr().err


def test_make_helpers_load_no_torch_or_transformers():
    """make runs them each time it reads a Makefile: they must stay cheap (the full CLI entry costs ~1.5 s)."""
    code = ("import sys; from kdcache.pipeline.make import main; main(['run-dir']); "
            "print(sorted(m for m in ('torch', 'transformers', 'zarr', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["runs/default", "[]"]
