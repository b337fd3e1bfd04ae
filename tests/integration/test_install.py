"""kdcache installed as a wheel (not editable) into a fresh virtual environment, then used from a folder of one's
own outside the repository: `kdcache run` with the default LocalCluster, and `kdcache init` + `make evaluate`."""
import os
import re
import shutil
import site
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "stages", "storage")


def _local_setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels by itself: then the wheel is built offline, without pip's isolated build
    environment (which downloads setuptools)."""
    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


def _check(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{out.args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with kdcache installed from a wheel built from this checkout. Its other
    packages (torch, transformers, ...) come from the environment running the tests."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a clean copy: no build/ or egg-info of earlier builds can leak into the wheel
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    isolation = ["--no-build-isolation"] if _local_setuptools_builds_wheels() else []
    _check(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"),
                           str(src)], capture_output=True, text=True))
    wheel, = (tmp / "dist").glob("kdcache-*.whl")

    env = tmp / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)],
                          capture_output=True, text=True))
    python = env / "bin" / "python"
    purelib = Path(_check(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                         capture_output=True, text=True)).stdout.strip())
    # the running environment's packages after the venv's own (when the tests run in a venv themselves); a .pth
    # adds folders only, so an editable kdcache's finder in there is not installed
    (purelib / "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _check(subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True))
    return env


def _env(venv: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "KDCACHE_HOME": str(tmp_path / "home"),
            "OMP_NUM_THREADS": "1"}


def test_the_wheel_installs_kdcache_and_its_stage_graph_into_the_venv(venv, tmp_path):
    code = ("import kdcache.pipeline, kdcache.stages.precompute, kdcache.storage; print(kdcache.pipeline.__file__)")
    where = _check(subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                                  cwd=tmp_path, env=_env(venv, tmp_path))).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO), where
    rules = _check(subprocess.run(["kdcache", "makefile"], capture_output=True, text=True, cwd=tmp_path,
                                  env=_env(venv, tmp_path))).stdout.strip()
    assert Path(rules).is_relative_to(venv) and Path(rules).read_text() == (REPO / "pipeline" / "stages.mk").read_text()
    assert shutil.which("kdcache", path=str(venv / "bin"))


def test_kdcache_run_with_the_local_cluster_from_a_folder_of_ones_own(venv, tmp_path, tiny_teacher):
    overrides = [o for o in tiny_overrides("runs/wheel", tiny_teacher) if not o.startswith("precompute.scheduler=")]
    out = _check(subprocess.run(["kdcache", "run", *(a for o in overrides for a in ("-s", o)),
                                 "-s", "precompute.threads_per_worker=1"],
                                capture_output=True, text=True, cwd=tmp_path, env=_env(venv, tmp_path), timeout=600))
    assert "precompute: LocalCluster with 1 worker(s) x 1 torch thread(s)" in out.stdout
    run = tmp_path / "runs" / "wheel"                      # relative to the folder it ran in
    assert (run / "student" / "final" / "config.json").exists()
    assert (run / "eval" / "metrics.json").exists()


def _edit(config: Path, **values) -> None:
    """Change fields of the generated config the way a user would: in place, keeping the comments."""
    text = config.read_text()
    for key, value in values.items():
        section, field = key.split(".")
        head, body = text.split(f"\n{section}:\n", 1)
        body, n = re.subn(rf"^  {field}: .*$", f"  {field}: {value}", body, count=1, flags=re.M)
        assert n == 1, key
        text = f"{head}\n{section}:\n{body}"
    config.write_text(text)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_init_then_make_evaluate_in_a_project_of_ones_own(venv, tmp_path, tiny_teacher):
    env = _env(venv, tmp_path)
    _check(subprocess.run(["kdcache", "init", "proj"], capture_output=True, text=True, cwd=tmp_path, env=env))
    project = tmp_path / "proj"
    assert f"PYTHON ?= {venv / 'bin' / 'python'}\n" in (project / "Makefile").read_text()
    tiny = dict(o.split("=", 1) for o in tiny_overrides("x", tiny_teacher))
    _edit(project / "kdcache.yaml", **{k: v for k, v in tiny.items() if "." in k})   # all but run_dir
    (project / "kdcache.yaml").write_text((project / "kdcache.yaml").read_text().replace(
        "\nrun_dir: runs/default\n", "\nrun_dir: runs/mine\n"))

    first = _check(subprocess.run(["make", "evaluate"], capture_output=True, text=True, cwd=project, env=env,
                                  timeout=600))
    for stage in ("prepare", "precompute", "train", "evaluate"):
        assert f"kdcache.pipeline.cli {stage} --run-dir runs/mine -c kdcache.yaml" in first.stdout
    assert (project / "runs" / "mine" / "eval" / "metrics.json").exists()   # RUN is the config's run_dir
    again = _check(subprocess.run(["make", "evaluate"], capture_output=True, text=True, cwd=project, env=env))
    assert "kdcache.pipeline.cli" not in again.stdout and "Nothing to be done for 'evaluate'" in again.stdout
