"""A spec that is not on this machine reaches the hub only when it looks like a hub id (org/name) and the hub can be
used; otherwise one error line at once, with no network attempt. A hub id that cannot be served fails at once too
(one check request, no download retries)."""
import socket
import time

import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import hub, prepare
from kdcache.stages.models import resolve_model_path
from tests.conftest import tiny_overrides
from tests.reliability.conftest import one_error_line

pytestmark = pytest.mark.integration


@pytest.fixture
def no_network(monkeypatch):
    """Any connection, and any call of the hub client, fails the test: a connection to another host than the
    loopback raises, and every attempt is recorded."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        attempts.append(address)
        if isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1"):
            return real_connect(self, address)
        raise AssertionError(f"network attempt to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(hub, "_FOUND", set())
    return attempts


def _args(run_dir, teacher, command, **extra):
    return [command] + [a for o in tiny_overrides(run_dir, teacher, **extra) for a in ("-s", o)]


def _timed_main(args):
    start = time.perf_counter()
    code = main(args)
    return code, time.perf_counter() - start


def test_misspelled_teacher_fails_at_once_without_network(tmp_path, tiny_teacher, no_network, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, seconds = _timed_main(_args(tmp_path / "run", tiny_teacher, "run", **{"precompute.teacher": "tiny-teacer"}))
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and seconds < 2, (code, seconds)
    assert line == ("kdcache: error: precompute.teacher 'tiny-teacer' is not a local path (no such file or folder) "
                    "and not a hub id (org/name)")
    assert no_network == []


def test_misspelled_student_fails_at_once_without_network(cached_run, tiny_teacher, no_network, capfd, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, seconds = _timed_main(_args(cached_run, tiny_teacher, "train", **{"train.student": "tiny-studnet"}))
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and seconds < 2, (code, seconds)
    assert line == ("kdcache: error: train.student 'tiny-studnet' is not a local path (no such file or folder) "
                    "and not a hub id (org/name)")
    assert no_network == []


@pytest.mark.parametrize("spec", ["tiny-teacer", "./models/t", "../t", "~/t", "/models/t", "a/b/c", "org/na me",
                                  "org/.hidden", "org/a..b", "-org/name", "org/"])
def test_only_the_org_name_shape_is_a_hub_id(spec, no_network):
    assert not hub.is_hub_id(spec)
    with pytest.raises(KdcacheError, match="is not a local path .* and not a hub id"):
        resolve_model_path(spec, "precompute.teacher")
    assert no_network == []


def test_hub_ids_have_the_org_name_shape():
    assert all(hub.is_hub_id(s) for s in ("org/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "a1/b_2.c-3"))


def test_a_hub_id_offline_and_not_cached_fails_at_once(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "_in_hub_cache", lambda spec: False)  # the cache folder is read at import time
    start = time.perf_counter()
    with pytest.raises(KdcacheError) as info:
        resolve_model_path("org/name", "precompute.teacher")
    assert time.perf_counter() - start < 2
    assert str(info.value) == ("precompute.teacher 'org/name' is not a local path (no such file or folder), and the "
                               "hub is offline (HF_HUB_OFFLINE=1) with no cached copy of it: unset HF_HUB_OFFLINE "
                               "to download it, or pass a local folder")
    assert no_network == []


def test_a_hub_id_offline_but_cached_is_left_to_the_hub_cache(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_in_hub_cache", lambda spec: True)
    assert resolve_model_path("org/name", "precompute.teacher") == "org/name"
    assert no_network == []


def test_a_hub_id_with_the_hub_unreachable_fails_within_seconds(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port: refused
    for what, call in [("precompute.teacher", lambda: resolve_model_path("org/name", "precompute.teacher")),
                       ("prepare.dataset", lambda: prepare.load_records(
                           load_config(None, ["prepare.dataset=org/name"]).prepare))]:
        start = time.perf_counter()
        with pytest.raises(KdcacheError) as info:
            call()
        assert time.perf_counter() - start < 5, what
        assert str(info.value).startswith(f"{what} 'org/name' is not a local path (no such file or folder), and the "
                                          "hub (http://127.0.0.1:9) cannot be reached ("), str(info.value)
    assert len(no_network) == 2 and all(a[0] == "127.0.0.1" for a in no_network)  # one request each, no retries


def _not_found(*args, **kwargs):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://hub")))


def test_a_hub_id_the_hub_does_not_have_fails_in_one_line(no_network, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "repo_info", _not_found)
    with pytest.raises(KdcacheError, match=r"^train.student 'org/name' is not a local path .*, and the hub \(.*\) "
                                           r"has no model org/name \(or it is private"):
        resolve_model_path("org/name", "train.student")


def test_a_hub_id_the_hub_has_is_checked_once(no_network, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, spec, **kw: calls.append((spec, kw["repo_type"])))
    assert resolve_model_path("org/name") == "org/name"
    assert resolve_model_path("org/name") == "org/name"
    assert calls == [("org/name", "model")]


def test_a_missing_dataset_that_is_no_hub_id_fails_at_once(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdcacheError, match=r"^prepare.dataset 'my-data' is not a local path \(no such file or "
                                           r"folder\) and not a hub id \(org/name\)$"):
        prepare.load_records(load_config(None, ["prepare.dataset=my-data"]).prepare)
    assert no_network == []


def test_a_hub_dataset_offline_says_the_hub_is_offline(no_network, monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises offline for a dataset it has not cached
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KdcacheError, match=r"^prepare.dataset 'org/name' is not a local path .*, and the hub is "
                                           r"offline \(HF_HUB_OFFLINE=1\) with no usable cached copy"):
        prepare.load_records(load_config(None, ["prepare.dataset=org/name"]).prepare)
    assert no_network == []
