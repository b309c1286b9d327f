"""Whole-model plans: after each layer has chosen its tactic, a few consistent assignments are
timed end to end and the fastest is kept.

Why: a layer's timing sees its own input as it arrived, not what its choice costs its neighbours.
With four tactics, a greedy per-layer choice can alternate layouts (a bf16 kernel whose output is
an f32 NCHW tensor, then PyTorch's bf16 conv that wants bf16 channels-last, then the kernel again,
...), and every switch is a full transposing pass over the activation. Seen on EDSR-baseline x2
at 4:32 (320x180, 1 thread, a loaded machine): with such a mix (first conv of each block on the
bf16 kernel, second on PyTorch's bf16 conv) the bf16 engine ran 0.7x the speed of the f32 engine;
in another session, whose per-layer choices were consistent, 2.0x. The plans are each layer's
fastest tactic within a set: all four (the greedy choice), the f32 ones, the bf16 ones, PyTorch's
bf16 conv only, the bf16 kernel wherever it applies, the fp16 kernel wherever it applies (PyTorch's
bf16 conv on the dense convs, as in its own set); and, for f32 engines too, every timed layer
dense or every one on the kernel. At 50% density (2:4) the kernel and PyTorch's f32 conv time within
noise of each other layer by layer, and a greedy choice that put all 36 convs of EDSR-baseline x2 on
the kernel ran 0.92x PyTorch's dense model end to end (bench_speed.py, 2 threads, idle); the
'f32 dense' plan, kept since, runs 1.03x.
Timed like everything else (:mod:`nmrestore.runtime.timing`): interleaved rounds, the median.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nmrestore.runtime.layers import LayerDecision, SparseLayer
from nmrestore.runtime.timing import interleaved

Key = tuple[int, tuple[int, ...], int]

#: Plan name -> the tactics each layer picks its fastest from (None: all, the greedy choice);
#: "bf16 kernel" / "fp16 kernel" prefer that sparse kernel wherever a layer has it.
PLANS: dict[str, tuple[str, ...] | None] = {
    "per-layer": None,
    "f32": ("dense", "sparse"),
    "f32 dense": ("dense",),
    "f32 kernel": ("sparse",),
    "bf16": ("dense_bf16", "sparse_bf16"),
    "bf16 dense": ("dense_bf16",),
    "bf16 kernel": ("sparse_bf16",),
    "fp16": ("dense_bf16", "sparse_fp16"),
    "fp16 kernel": ("sparse_fp16",),
}


def _pick(times: dict[str, float], allowed: tuple[str, ...] | None, name: str) -> str | None:
    if name.endswith(" kernel") and allowed is not None and allowed[0] in times and allowed[0] != "sparse":
        return allowed[0]
    pool = {t: ms for t, ms in times.items() if allowed is None or t in allowed}
    if name in ("bf16 kernel", "fp16 kernel"):
        # a layer without that kernel (first/last conv): its fastest 16-bit tactic, or any
        pool = {t: ms for t, ms in times.items() if t.endswith(("bf16", "fp16"))} or dict(times)
    return min(pool, key=pool.__getitem__) if pool else None


def assignments(
    fresh: Sequence[tuple[SparseLayer, Key]], decisions: dict[Any, LayerDecision]
) -> dict[str, dict[tuple[SparseLayer, Key], str]]:
    """Every distinct plan's choice per (layer, key) among the layers timed in this forward."""
    plans: dict[str, dict[tuple[SparseLayer, Key], str]] = {}
    for name, allowed in PLANS.items():
        plan: dict[tuple[SparseLayer, Key], str] = {}
        for layer, key in fresh:
            decision = decisions.get((layer.layer_name, *key))
            if decision is None or len(decision.times_ms) < 2:
                continue  # forced or nothing to choose: left as it is
            choice = _pick(decision.times_ms, allowed, name)
            if choice is not None:
                plan[(layer, key)] = choice
        if plan and plan not in plans.values():
            plans[name] = plan
    return plans


#: An f32 layer whose two tactics timed within this factor of each other makes the whole-model plans
#: worth timing (a few more forwards on the first call of a shape); otherwise they would only agree.
CLOSE_CALL = 1.25


def close_call(
    fresh: Sequence[tuple[SparseLayer, Key]],
    decisions: dict[Any, LayerDecision],
) -> bool:
    """Whether some layer's two fastest tactics timed within ``CLOSE_CALL`` of each other."""
    for layer, key in fresh:
        decision = decisions.get((layer.layer_name, *key))
        times = sorted(decision.times_ms.values()) if decision is not None else []
        if len(times) > 1 and times[1] < CLOSE_CALL * times[0]:
            return True
    return False


def refine(
    fresh: Sequence[tuple[SparseLayer, Key]],
    decisions: dict[Any, LayerDecision],
    run: Callable[[], object],
    repeats: int,
    layers: Sequence[SparseLayer],
) -> str | None:
    """Time the distinct plans on ``run()`` (interleaved, one warm-up round that also sets up each
    plan's hand-offs), apply the fastest and return its name (None when there was nothing to try)."""
    plans = assignments(fresh, decisions)
    if len(plans) < 2:
        return None

    def apply(plan: dict[tuple[SparseLayer, Key], str]) -> None:
        for (layer, key), choice in plan.items():
            layer._choices.by_key[key] = choice

    # Each plan runs with the hand-offs its own consumers asked for, not those left by the plan
    # before it (an f32 consumer's request would make a producer write f32 beside its 16-bit copy).
    handoffs: dict[str, list[object]] = {}

    def timed(name: str, plan: dict[tuple[SparseLayer, Key], str]) -> object:
        apply(plan)
        for i, layer in enumerate(layers):
            if name in handoffs:
                layer.set_handoff_state(handoffs[name][i])
            else:
                layer.reset_handoff()  # its first (warm-up) run asks afresh
        out = run()
        handoffs[name] = [layer.handoff_state() for layer in layers]
        return out

    timings = interleaved(
        {name: (lambda n=name, p=plan: timed(n, p)) for name, plan in plans.items()}, repeats, warmup=1
    )
    best = min(plans, key=timings.median)
    apply(plans[best])
    for (layer, key), choice in plans[best].items():
        decision = decisions[(layer.layer_name, *key)]
        if decision.choice != choice:
            decision.choice = choice
            decision.reason = f"{decision.reason}; whole-model plan {best!r}"
    for layer in layers:  # hand-off requests of the other plans would make producers write unread copies
        layer.reset_handoff()
    return best
