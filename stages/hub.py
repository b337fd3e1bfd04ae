"""Hub lookups that fail at once: a model or dataset spec that is not on this machine.

A spec that names nothing local is looked up on the Hugging Face hub only when it has the hub's `org/name` shape;
anything else (a misspelled folder `tiny-teacer`, `data/x`, `./model`) is an error at once, with no network
attempt. A hub id is then checked with one request (no retries, a short timeout) before transformers / datasets
download it: their downloads retry a refused or timed-out connection with back-off for ~50 s before giving up.
With HF_HUB_OFFLINE=1 no request is made: a hub model is usable only from the local hub cache.
"""
from __future__ import annotations

import os
import re

from kdcache.pipeline.errors import KdcacheError

# org/name: one slash, each part starting with a letter or digit, then letters, digits, '-', '_', '.'
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TIMEOUT_S = 5.0  # the one check request; a hub that does not answer within this is reported unreachable
_FOUND: set[tuple[str, str]] = set()  # (spec, repo_type) the hub has answered for in this process: asked once


def is_hub_id(spec: str) -> bool:
    """Whether spec has the shape of a hub repository id, org/name (the hub refuses '..' and '--' in names)."""
    return bool(HUB_ID.fullmatch(spec)) and ".." not in spec and "--" not in spec


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def not_local(what: str, spec: str) -> str:
    return f"{what} {spec!r} is not a local path (no such file or folder)"


def check_hub_id(spec: str, what: str, repo_type: str = "model") -> None:
    """Refuse, in one line and at once, a spec that is not on this machine unless the hub can serve it:
    `spec` must look like org/name; offline, a model must be in the local hub cache (a dataset is left to the
    datasets library's own offline cache); online, the hub must answer that the repository exists.
    `what` names the setting in the message (e.g. "precompute.teacher")."""
    if not is_hub_id(spec):
        raise KdcacheError(f"{not_local(what, spec)} and not a hub id (org/name)")
    if (spec, repo_type) in _FOUND:
        return
    if hub_offline():
        if repo_type == "model" and not _in_hub_cache(spec):
            raise KdcacheError(f"{not_local(what, spec)}, and the hub is offline (HF_HUB_OFFLINE=1) with no cached "
                               "copy of it: unset HF_HUB_OFFLINE to download it, or pass a local folder")
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    endpoint = hub_endpoint()
    try:  # a plain request: the hub client's back-off retries are for downloads, not for this one check
        HfApi(endpoint=endpoint).repo_info(spec, repo_type=repo_type, timeout=TIMEOUT_S)
    except GatedRepoError:
        raise KdcacheError(f"{not_local(what, spec)}, and {spec} is a gated {repo_type} on the hub: request access "
                           "on its hub page and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise KdcacheError(f"{not_local(what, spec)}, and the hub ({endpoint}) has no {repo_type} {spec} (or it is "
                           "private: log in with `hf auth login`)") from None
    except Exception as e:  # connection refused, DNS, timeout, TLS, a proxy's error page: the hub cannot be used
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        cached = (" (a copy of it is cached: set HF_HUB_OFFLINE=1 to use it)"
                  if repo_type == "model" and _in_hub_cache(spec) else "")
        raise KdcacheError(f"{not_local(what, spec)}, and the hub ({endpoint}) cannot be reached ({reason}){cached}: "
                           "check the network, or pass a local folder") from None
    _FOUND.add((spec, repo_type))


def _in_hub_cache(spec: str) -> bool:
    """Whether the local hub cache holds a model repository's config.json (enough for offline from_pretrained)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str)
