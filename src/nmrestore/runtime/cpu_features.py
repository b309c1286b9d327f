"""The CPU's reduced-precision features, read from ``/proc/cpuinfo`` (Linux; elsewhere unknown).

What they tell a reader of a speed table: on a CPU with AVX512-BF16 or AMX, OpenVINO's default
inference precision on the CPU is bf16, so its default row is a bf16 run, not an f32 one; with
AVX512-FP16 the sparse kernel has an fp16 form.
"""

from __future__ import annotations

from pathlib import Path

#: The /proc/cpuinfo flags reported, in order.
FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_features(cpuinfo: Path = CPUINFO) -> dict[str, bool | None]:
    """``{flag: present}`` for :data:`FLAGS`; every value None when the flags cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return dict.fromkeys(FLAGS)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return {flag: flag in present for flag in FLAGS}
    return dict.fromkeys(FLAGS)


def describe_features(features: dict[str, bool | None]) -> str:
    """One line: ``CPU: avx512_bf16 yes, amx_bf16 yes, amx_tile yes``."""
    words = {True: "yes", False: "no", None: "unknown"}
    return "CPU: " + ", ".join(f"{flag} {words[features.get(flag)]}" for flag in FLAGS)
