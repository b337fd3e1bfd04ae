"""The `kdcache` command: one subcommand per stage, `run` for the whole chain, and store tools."""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import sys
from pathlib import Path

import click

from kdcache.pipeline.config import BACKENDS, LOSS_NAMES, Config, check_scheduler, check_source_name, load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.pipeline.freshness import mark_done, precompute_stage, write_stamps

DEBUG = {"on": False}


def config_options(f):
    """-c/--config FILE, -s/--set section.field=value (repeatable), --run-dir DIR, --trust-remote-code."""
    @click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="YAML config file (defaults apply to everything it leaves out).")
    @click.option("-s", "--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
                  help="Override one config field, e.g. -s train.lr=1e-4 (repeatable).")
    @click.option("--run-dir", default=None, help="Run folder for all stage outputs (default runs/default).")
    @click.option("--trust-remote-code", is_flag=True,
                  help="Let hub teachers/students/tokenizers run the Python code they ship (off by default).")
    @functools.wraps(f)
    def wrapper(config_path, overrides, run_dir, trust_remote_code, **kwargs):
        overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
        if trust_remote_code:
            overrides += ["precompute.trust_remote_code=true", "train.trust_remote_code=true"]
        cfg = load_config(config_path, overrides)
        # no RUN/config.yaml: each stage records the config it ran with beside its outputs when its work starts
        # (record_config), so a command refused here or by the stage's own checks leaves nothing behind
        return f(cfg, **kwargs)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool):
    """kdcache: run the teacher once, cache its sparse signal, train students from the cache."""
    DEBUG["on"] = debug


@cli.command()
@config_options
@click.option("--overwrite", is_flag=True, help="Replace an existing token store built from other inputs.")
def prepare(cfg: Config, overwrite: bool):
    """Tokenise the dataset into a token store (RUN/tokens)."""
    from kdcache.stages import prepare as stage

    stage.run(cfg, overwrite=overwrite)
    mark_done(cfg, "prepare")


@cli.command()
@config_options
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask scheduler address (tcp://host:port), 'local' (LocalCluster) or 'sync' (in-process).")
@click.option("--overwrite", is_flag=True, help="Replace an existing signal store built from other inputs.")
@click.option("--source", default=None, metavar="NAME",
              help="Cache only this one source (e.g. a complementary teacher) in RUN/signals/NAME.")
@click.option("--model", default=None, metavar="SPEC",
              help="The model of --source: a local dir, .gguf file or hub id (default precompute.teacher, e.g. "
                   "a top-k cache of the teacher beside the default sampled one: --source topk "
                   "-s precompute.signal=topk).")
def precompute(cfg: Config, scheduler: str | None, overwrite: bool, source: str | None, model: str | None):
    """Run the teacher and every precompute.members entry once; cache each one's signal (RUN/signals/<source>)."""
    from kdcache.stages import precompute as stage

    if scheduler is not None:
        check_scheduler(scheduler, "--scheduler")
    if model is not None and source is None:
        raise KdcacheError("--model needs --source NAME: the signal store the model's signal is cached in")
    if source is not None:
        check_source_name(source, "--source")
        model = model or _source_model(cfg, source)
    stage.run(cfg, scheduler=scheduler, overwrite=overwrite, source=source, model=model)
    if source is None:  # precompute.done means: the teacher and all members are cached
        mark_done(cfg, "precompute")
    elif source == cfg.assistants.source:
        mark_done(cfg, precompute_stage(source))


def _source_model(cfg: Config, source: str) -> str | None:
    """The model behind a named source when none is given: the chosen assistant for the assistants' source, the
    teacher (None: precompute.teacher) for any other, e.g. a second cache of the teacher of another kind."""
    if source == cfg.assistants.source:
        chosen = cfg.assistants_dir / "chosen"
        if not (chosen / "config.json").exists():
            raise KdcacheError(f"no chosen assistant at {chosen}: run `kdcache assistants` first (or pass --model)")
        return str(chosen)
    return None


@cli.command()
@config_options
@click.option("--overwrite", is_flag=True, help="Replace RUN/assistants built from other inputs.")
def assistants(cfg: Config, overwrite: bool):
    """MiniDisc: prune the teacher, train one slimmable assistant from the cache, choose by P + λ·sparsity
    (RUN/assistants: ta_plan.json, ta_tradeoff.png, chosen/)."""
    from kdcache.stages import assistants as stage

    plan = stage.run(cfg, overwrite=overwrite)
    mark_done(cfg, "assistants", {"chosen_sparsity": plan["chosen"]["sparsity"]})


@cli.command()
@config_options
@click.option("--loss", default=None,
              help=f"Objective: {', '.join(n for n in LOSS_NAMES if '+' not in n)} or rlkd+<kl|rkl|...> "
                   "(shorthand for -s train.loss=...).")
@click.option("--no-adaptive", is_flag=True,
              help="TAID with the linear t schedule only (shorthand for -s train.taid_adaptive=false).")
@click.option("--overwrite", is_flag=True,
              help="Start over a student trained with other settings (its checkpoints, log and evaluation are "
                   "removed) instead of refusing.")
@click.option("--no-resume", is_flag=True, hidden=True, help="Deprecated: --overwrite.")
def train(cfg: Config, loss: str | None, no_adaptive: bool, overwrite: bool, no_resume: bool):
    """Train the student from the cached signal (RUN/student); resumes from the last checkpoint.

    Into RUN/<train.output> (default RUN/student). A raised train.max_steps continues the student; other changed
    settings are refused (see --overwrite, or -s train.output=NAME for a new student beside it)."""
    from kdcache.stages import train as stage

    if no_resume:
        click.echo("kdcache: --no-resume is deprecated: use --overwrite", err=True)
        overwrite = True
    if loss is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss=loss))
    if no_adaptive:
        if cfg.train.loss != "taid":
            raise KdcacheError(f"--no-adaptive applies to --loss taid only, not {cfg.train.loss!r}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, taid_adaptive=False))
    stage.run(cfg, overwrite=overwrite)
    mark_done(cfg, "train")


@cli.command()
@config_options
@click.option("--overwrite", is_flag=True,
              help="Accepted as by every stage that writes (evaluate always replaces its own earlier evaluation).")
def evaluate(cfg: Config, overwrite: bool):
    """Compare trained and untrained student with the teacher on held-out data (RUN/eval).

    RUN/NAME/eval for train.output=NAME. How the student was trained (loss, source, committee, ...) is read from
    its recorded RUN/<train.output>/config.yaml, not from the flags given."""
    from kdcache.stages import evaluate as stage

    stage.run(cfg)
    mark_done(cfg, "evaluate")


@cli.command()
@config_options
@click.option("--scheduler", default=None, metavar="ADDRESS", help="dask scheduler for precompute.")
@click.option("--assistant", is_flag=True,
              help="Through a MiniDisc teacher assistant: ... -> precompute -> assistants -> precompute the "
                   "assistant -> train from the assistant's cache -> evaluate against the teacher.")
@click.option("--overwrite", is_flag=True,
              help="Passed to every stage: replace outputs made from other inputs, start over a student trained "
                   "with other settings.")
def run(cfg: Config, scheduler: str | None, assistant: bool, overwrite: bool):
    """The whole chain: prepare -> precompute -> train -> evaluate (each resumes or skips finished work)."""
    from kdcache.stages import evaluate, precompute, prepare, train

    if scheduler is not None:  # before prepare runs, not after it
        check_scheduler(scheduler, "--scheduler")
    prepare.run(cfg, overwrite=overwrite)
    mark_done(cfg, "prepare")
    precompute.run(cfg, scheduler=scheduler, overwrite=overwrite)
    mark_done(cfg, "precompute")
    if assistant:
        from kdcache.stages import assistants

        assistants.run(cfg, overwrite=overwrite)
        mark_done(cfg, "assistants")
        source = cfg.assistants.source
        precompute.run(cfg, scheduler=scheduler, overwrite=overwrite, source=source,
                       model=_source_model(cfg, source))
        mark_done(cfg, precompute_stage(source))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, source=source))
    train.run(cfg, overwrite=overwrite)
    mark_done(cfg, "train")
    evaluate.run(cfg)
    mark_done(cfg, "evaluate")


# The Makefile's helpers (pipeline/stages.mk): hidden from --help, as users never type them.
@cli.command(hidden=True)
@config_options
def stamps(cfg: Config):
    """Record each stage's config inputs in RUN/.stages (rewritten only on change; the Makefile's stage graph)."""
    changed = write_stamps(cfg)
    if changed:
        click.echo(f"config changed for: {', '.join(changed)}", err=True)


@cli.command("run-dir", hidden=True)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("-s", "--set", "overrides", multiple=True)
@click.option("--run-dir", default=None)
@click.option("--trust-remote-code", is_flag=True)  # accepted as every stage does; it does not move the run folder
def run_dir_command(config_path: str | None, overrides: tuple[str, ...], run_dir: str | None,
                    trust_remote_code: bool):
    """Print the run folder the config and overrides give (the Makefile's RUN); writes nothing."""
    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    click.echo(load_config(config_path, overrides).run_dir)


@cli.command(hidden=True)
def makefile():
    """Print the path of the stage graph that ships with kdcache, for a Makefile to include."""
    from kdcache.pipeline.project import RULES

    click.echo(RULES)


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace a Makefile or kdcache.yaml already in DIRECTORY.")
def init(directory: str, overwrite: bool):
    """Start a project of your own in DIRECTORY: a Makefile that runs this installed kdcache's stage graph and
    kdcache.yaml, every setting at its default with what it does. Then: cd DIRECTORY && make evaluate."""
    from kdcache.pipeline.project import init_project

    written = init_project(Path(directory), overwrite=overwrite)
    click.echo(f"init: wrote {' and '.join(str(p) for p in written)}; next: cd {directory}, edit kdcache.yaml, "
               "make evaluate (make help lists the targets)")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(store: str, as_json: bool):
    """Describe a token or signal store: kind, sizes, bytes per token, teacher mass covered."""
    from kdcache.stages.inspect import describe

    info = describe(Path(store))
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            click.echo(f"{key:>{width}}: {value}")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def verify(store: str, as_json: bool):
    """Check every shard of a store (present, committed, checksums, readable, shapes) and its manifest; list ALL
    problems, one line each. Exit code 0 when clean, 1 when there are problems."""
    from kdcache.stages.progress import track
    from kdcache.storage.tools import verify_store

    problems, checked = verify_store(Path(store), track=None if as_json else track)
    if as_json:
        click.echo(json.dumps({"path": store, "ok": not problems, "shards_checked": checked, "problems": problems},
                              indent=1))
    else:
        for line in problems:
            click.echo(line)
        click.echo(f"{store}: {checked} shards checked, " + (f"{len(problems)} problems" if problems else "ok"),
                   err=bool(problems))
    if problems:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--backend", type=click.Choice(BACKENDS), required=True, help="Backend of the new store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at DST made from other inputs.")
def convert(src: str, dst: str, backend: str, overwrite: bool):
    """Rewrite a store into another backend at DST, shard by shard (same arrays and fingerprint; resumable)."""
    from kdcache.stages.progress import track
    from kdcache.storage.tools import convert_store

    store = convert_store(Path(src), Path(dst), backend, overwrite=overwrite, track=track)
    click.echo(f"convert: {len(store.manifest.shards)} shards, {store.nbytes() / 1e6:.1f} MB ({backend}) -> {dst}")


@cli.command()
@click.argument("folder", metavar="[RUN_DIR]", type=click.Path(), required=False)
@click.option("--run-dir", default=None, help="The run folder or folder of runs to report on (same as RUN_DIR).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file: report on its run_dir (when no RUN_DIR / --run-dir is given).")
def report(folder: str | None, run_dir: str | None, config_path: str | None):
    """Markdown + HTML report with PNG plots of a run folder or a folder of runs (RUN/report). The folder is
    RUN_DIR or --run-dir, else the run_dir of -c CONFIG, else runs/default."""
    from kdcache.stages import report as stage

    if folder and run_dir and Path(folder) != Path(run_dir):
        raise KdcacheError(f"report got two folders, RUN_DIR {folder} and --run-dir {run_dir}: pass one")
    stage.run(Path(folder or run_dir or load_config(config_path).run_dir))


@cli.command()
def doctor():
    """Check the environment: packages, device, the default teacher, disk; print what is missing and how to fix it."""
    from kdcache.pipeline.doctor import report, run_checks

    text, healthy = report(run_checks())
    click.echo(text)
    if not healthy:
        raise click.exceptions.Exit(1)


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars and warnings are noise."""
    import warnings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (tracebacks with --debug)."""
    from kdcache.storage.errors import StoreError

    _quiet_libraries()
    try:
        # a command's own non-zero exit (click Exit) comes back as a return value in non-standalone mode
        code = cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except (KdcacheError, StoreError) as e:
        if DEBUG["on"]:
            raise
        click.echo(f"kdcache: error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("kdcache: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except OSError as e:
        if e.errno != errno.ENOSPC or DEBUG["on"]:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        click.echo(f"kdcache: error: disk full{where} (no space left on device): finished shards and checkpoints "
                   "are kept and every store is still consistent; free space and rerun to resume", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("kdcache: interrupted (finished shards and checkpoints are kept; rerun to resume)", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
