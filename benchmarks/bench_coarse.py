"""Coarse (block-shared) N:M against per-channel N:M: what the pattern costs in PSNR, what it buys in speed.

"Coarse" N:M keeps, in every block of 16 output channels, the same N of every M input channels at
each kernel position (the block's summed magnitudes choose), so a block's kept inputs form a dense K
axis that AMX tile products can use (``proto/coarse_amx.cpp``). Per-channel N:M, what nmrestore
trains, chooses per output channel. Both keep N/M of the weights.

Protocol, on the photo study's dense model (``bench_photos.py``, found in its cache by recipe digest,
never trained here): every prunable layer of the study pruned one-shot by magnitude, without
fine-tuning, once per pattern at each budget; scored on the test photos with the study's protocol
(Y PSNR, its 96x96 HR tiles), so ``coarse - per-channel`` is a paired difference with a 95% interval.
Fine-tuning would recover part of either gap; the one-shot figure is the pattern's own cost on the
same weights. Speed: one EDSR body conv (64->64, 3x3) on the prototype against the engine's kernels
and dense oneDNN, interleaved in one run (``_coarse.py``); skipped on a CPU without AMX.

    .venv/bin/python benchmarks/bench_coarse.py --study-dir runs/photos-study   # PSNR + speed
    .venv/bin/python benchmarks/bench_coarse.py --speed-only   # speed again, the committed PSNR rows kept
    .venv/bin/python benchmarks/bench_coarse.py --render                         # the section from its JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _coarse import coarse_weight, run_coarse, run_coarse_block, run_coarse_model  # noqa: E402
from _report import markdown_table, section_main  # noqa: E402
from _roofline import machine_note, machine_state, quiet_ceilings  # noqa: E402
from bench_photos import study_config  # noqa: E402
from nmrestore.bench.config import dense_recipe, ensure_dense, test_source  # noqa: E402
from nmrestore.bench.context import BenchContext, per_image_columns  # noqa: E402
from nmrestore.bench.evidence import compare, format_delta  # noqa: E402
from nmrestore.cost import count_cost  # noqa: E402
from nmrestore.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nmrestore.engine.evaluate import evaluate_model  # noqa: E402
from nmrestore.engine.runner import build_eval_dataset, model_from_checkpoint  # noqa: E402
from nmrestore.sparsity import nm, nm_layers  # noqa: E402
from nmrestore.sparsity.api import eligible_layers  # noqa: E402

SECTION = "coarse"
BLOCK = 16
BUDGETS = ("4:32", "2:32")
STAGES = ("one-shot", "fine-tuned", "SR-STE")
STUDY_ROWS = ROOT / "docs" / "bench" / "photos_x4.json"  # the study's fine-tuned per-channel rows


def pruned(model: torch.nn.Module, n: int, m: int, coarse: bool) -> torch.nn.Module:
    """A copy of ``model`` with every prunable layer N:M one-shot (coarse or per-channel)."""
    import copy

    out = copy.deepcopy(model)
    layers, _dense = eligible_layers(out, m)
    with torch.no_grad():
        for info in layers:
            w = info.module.weight
            blocked = coarse and w.dim() == 4 and w.shape[0] % BLOCK == 0
            kept = coarse_weight(w, n, m, BLOCK) if blocked else w * (nm.compute_ranks(w, m) < n)
            w.copy_(kept)
    return out


def speed_rows(args: argparse.Namespace) -> dict[str, Any]:
    """The speed rows and the machine's state around them ({} with ``--no-speed``)."""
    if args.no_speed:
        return {}
    before = machine_state()
    speed = run_coarse((180, 320), args.repeats, tuple(args.budgets))
    block_speed = run_coarse_block((180, 320), args.repeats, tuple(args.budgets))
    model_speed = run_coarse_model((180, 320), args.repeats, tuple(args.budgets))
    return {
        "machine_before": before,
        "machine_after": machine_state(),
        "quiet_ceilings": quiet_ceilings(),
        "speed": speed,
        "block_speed": block_speed,
        "model_speed": model_speed,
        "speed_repeats": args.repeats,
    }


def measure_speed_only(args: argparse.Namespace) -> dict[str, Any]:
    """``--speed-only``: the committed run's PSNR rows kept as they are (with the command and date
    that measured them), the speed rows measured again."""
    torch.set_num_threads(args.threads)
    path = ROOT / "docs" / "bench" / f"{SECTION}.json"
    if not path.is_file():
        raise SystemExit(f"--speed-only needs the PSNR rows of an earlier run in {path}")
    old = json.loads(path.read_text())
    kept = {k: old[k] for k in ("dense_digest", "scale", "block", "rows")}
    psnr_from = old.get("psnr_from") or {"command": old.get("command"), "date": old.get("date")}
    return {**kept, "psnr_from": psnr_from, **speed_rows(args)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.speed_only:
        return measure_speed_only(args)
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    config = study_config(args.scale, args.data, args.study_dir, False, None, args.threads, cached_only=True)
    dense = ensure_dense(config, echo)
    model = model_from_checkpoint(dense.path)[0].eval()
    eval_set = build_eval_dataset(test_source(config), args.scale, dense_recipe(config).task)

    def score(net: torch.nn.Module, method: str, budget: str | None) -> dict[str, Any]:
        with torch.no_grad():
            result = evaluate_model(net, eval_set, args.scale, True, with_ssim=False, tile=config.ci_tile)
        echo(f"{method} {budget or ''}: {result.psnr:.3f} dB")
        return {"method": method, "budget": budget, "psnr": result.psnr, **per_image_columns(result)}

    rows = [score(model, "dense", None)]
    work_dir = args.study_dir / f"x{args.scale}"
    context = BenchContext(config, dense, model, count_cost(model), eval_set, work_dir, echo=echo)
    study = {(r["method"], r.get("budget")): r for r in json.loads(STUDY_ROWS.read_text())["rows"]}
    for budget in args.budgets:
        n, m = (int(v) for v in budget.split(":"))
        for coarse in (False, True):
            name = "coarse" if coarse else "per-channel"
            one_shot = pruned(model, n, m, coarse)
            rows.append(score(one_shot, f"{name} one-shot", budget))
            if not coarse:  # fine-tuned: the study's own one-shot row (same recipe, same tiles)
                rows.append({**study[("oneshot", budget)], "method": "per-channel fine-tuned"})
                continue
            # the study's one-shot fine-tune started from the coarse-pruned weights: its per-channel
            # magnitude mask on them is exactly the coarse mask (N non-zeros left per group), kept fixed
            init = work_dir / f"coarse-init-{n}of{m}.safetensors"
            save_checkpoint(init, one_shot, load_checkpoint(dense.path).meta, with_rng=False)
            tuned = replace(context, dense=replace(dense, path=init))
            run = tuned.finetune(f"coarse{BLOCK}-oneshot-{budget}", {"method": "oneshot", "n": n, "m": m})
            net = model_from_checkpoint(run.run_dir / "checkpoints" / "last.safetensors")[0].eval()
            rows.append(score(net, "coarse fine-tuned", budget))
            fixed = {name: mask.mask() for name, _, mask in nm_layers(net)}
            # trained masks: SR-STE from the dense model with out_block, the study's SR-STE recipe
            # otherwise (its per-channel row is the study's own)
            rows.append({**study[("srste", budget)], "method": "per-channel SR-STE"})
            sparsity = {"method": "srste", "n": n, "m": m, "out_block": BLOCK}
            run = context.finetune(f"coarse{BLOCK}-srste-{budget}", sparsity)
            net = model_from_checkpoint(run.run_dir / "checkpoints" / "last.safetensors")[0].eval()
            trained = {name: mask.mask() for name, _, mask in nm_layers(net)}
            changed = sum(int((trained[k] != fixed[k]).sum()) for k in fixed)
            entries = sum(v.numel() for v in fixed.values())
            rows.append({**score(net, "coarse SR-STE", budget), "mask_changed": changed, "mask_entries": entries})
    return {"dense_digest": dense.digest, "scale": args.scale, "block": BLOCK, "rows": rows, **speed_rows(args)}


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of the section, from the JSON alone."""
    rows = payload["rows"]
    dense = rows[0]
    table = []
    by = {(r["method"], r["budget"]): r for r in rows}
    for budget in dict.fromkeys(r["budget"] for r in rows[1:]):
        for stage in STAGES:
            if (f"coarse {stage}", budget) not in by:  # runs recorded before SR-STE rows existed
                continue
            fine, coarse = by[(f"per-channel {stage}", budget)], by[(f"coarse {stage}", budget)]
            delta = compare(coarse, fine)
            table.append(
                {
                    "N:M": budget,
                    "masks": stage,
                    "per-channel PSNR": f"{fine['psnr']:.3f}",
                    "coarse PSNR": f"{coarse['psnr']:.3f}",
                    "coarse - per-channel [95% CI]": format_delta(delta.to_dict() if delta else None),
                    "coarse - dense": format_delta(compare(coarse, dense).to_dict()),
                }
            )
    lines = [
        f"The photo study's dense x{payload['scale']} model ({dense['psnr']:.3f} dB, recipe "
        f"{payload['dense_digest']}) with every prunable layer pruned by magnitude per output channel "
        f"(what nmrestore trains) or with one mask per block of {payload['block']} output channels "
        "(coarse: a block's kept inputs form a dense K axis for AMX tiles); 'one-shot': no training, "
        "'fine-tuned': the study's one-shot fine-tune (300 steps, masks fixed; the per-channel row is "
        "the study's own); 'SR-STE': the study's SR-STE fine-tune from the dense model (300 steps, masks "
        "recomputed every step; coarse: `out_block` in its recipe). Test photos, Y PSNR (image means), paired 95% intervals over the study's "
        "96x96 HR tiles (tile means, which can differ in sign from the image means).",
        "",
        *(
            [f"PSNR rows from `{payload['psnr_from']['command']}` ({payload['psnr_from']['date']}); the speed "
             "rows below from this section's command.", ""]
            if payload.get("psnr_from") else []
        ),
        markdown_table(table, list(table[0])),
        "",
    ]
    if payload.get("speed"):
        intros = {
            "speed": f"Speed of one EDSR body conv (64->64, 3x3, 320x180, median of {payload['speed_repeats']} "
            "interleaved rounds, one run): the coarse prototype (`benchmarks/proto/coarse_amx.cpp`, AMX "
            "bf16) against the engine's per-channel kernels and dense oneDNN.",
            "block_speed": "One EDSR residual block (conv, ReLU, conv, + skip; 64 channels, 320x180, same rounds): "
            "the prototype with its epilogue fused as an engine would run it (the first conv writes the second's "
            "bf16 input, ReLU applied; the second adds the f32 skip and writes the f32 output and the next "
            "block's bf16 input) against oneDNN's dense bf16 block (channels-last, skip added in bf16).",
            "model_speed": "The whole EDSR-baseline x2 (320x180 LR, masks with `out_block` 16, magnitude on a "
            "fresh model) with every pruned conv on the prototype, epilogues fused and bf16 hand-offs between "
            "convs (`CoarseEDSR` in `benchmarks/_coarse.py`; PyTorch runs the first conv in f32 and the last on "
            "oneDNN in bf16), against OpenVINO's default precision (AMX) on the same dense-with-zeros model, "
            "interleaved; max abs diff against PyTorch f32. A prototype pipeline for EDSR only, kept as the record "
            "it was: the engine's bf16 kernel now has its own AMX path for such masks (section "
            "`speed_dense_runtime`, docs/ARCHITECTURE.md).",
        }
        for key, intro in intros.items():
            if payload.get(key):  # runs recorded before the block and model rows existed have neither
                table_rows = payload[key]
                lines += [intro, "", markdown_table(table_rows, list(dict.fromkeys(k for r in table_rows for k in r))), ""]
        if payload.get("machine_before"):
            lines += [machine_note(payload), ""]
    else:
        lines += ["Speed: not measured in this run (no AMX, or `--no-speed`).", ""]
    trained = "SR-STE" if any(r["method"] == "coarse SR-STE" for r in rows) else "fine-tuned"
    tuned = [r for r in table if r["masks"] == trained]
    verdict = "; ".join(f"{r['N:M']}: {r['coarse - per-channel [95% CI]']} dB" for r in tuned)
    lines += [
        f"At the same N:M, after the same training ({trained}), the coarse pattern loses to per-channel N:M ({verdict}, "
        "tile means). But it runs on AMX, so the fair comparison is at the same speed: coarse at a larger N "
        "against per-channel at a smaller one.",
        "",
    ]
    speed_of = {r["N:M"]: r for r in payload.get("speed") or []}
    budgets = sorted({r["budget"] for r in rows[1:]}, key=lambda b: int(b.split(":")[0]))
    wins = []
    for small, large in itertools.pairwise(budgets):
        coarse, fine = by[(f"coarse {trained}", large)], by[(f"per-channel {trained}", small)]
        delta = compare(coarse, fine)
        ms = ""
        faster = large in speed_of and small in speed_of and (
            speed_of[large]["coarse AMX ms"] < speed_of[small]["per-channel bf16 kernel ms"]
        )
        wins.append(bool(delta and delta.low > 0 and faster))
        if large in speed_of and small in speed_of:
            ms = (
                f", one body conv {speed_of[large]['coarse AMX ms']:.2f} ms (coarse {large}, AMX) against "
                f"{speed_of[small]['per-channel bf16 kernel ms']:.2f} ms (per-channel {small}, bf16 kernel) and "
                f"{speed_of[small]['per-channel f32 kernel ms']:.2f} ms (f32 kernel)"
            )
        lines.append(
            f"- coarse {large} ({coarse['psnr']:.3f} dB) - per-channel {small} ({fine['psnr']:.3f} dB): "
            f"{format_delta(delta.to_dict() if delta else None)} dB{ms}."
        )
    finding = (
        "So on a CPU with AMX, coarse N:M at a larger N gives a faster conv and a higher PSNR (interval above "
        "0) than per-channel N:M at the smaller N, on these rows."
        if wins and all(wins)
        else "So coarse N:M does not beat per-channel N:M at the same conv speed on these rows."
    )
    dense_note = ""
    if speed_of:
        parts = [
            f"{nm}: per-channel bf16 kernel {r['per-channel bf16 kernel ms'] / r['dense bf16 (oneDNN) ms']:.2f}x "
            f"its time, coarse {r['coarse AMX ms'] / r['dense bf16 (oneDNN) ms']:.2f}x"
            for nm, r in speed_of.items()
        ]
        dense_note = (
            " Dense bf16 is the bar on such a CPU: oneDNN's channels-last conv runs on AMX too, and the "
            "sparse convs take, against its time on the dense weights, " + "; ".join(parts) + "."
        )
    lines += [
        "",
        finding + dense_note + (
            " The masks train with SR-STE (`out_block` in a recipe's `sparsity`), but in these 300 steps it "
            "changed " + ", ".join(
                f"{r['mask_changed']} of {r['mask_entries']} mask entries at {r['budget']}"
                for r in rows if r["method"] == "coarse SR-STE" and "mask_changed" in r
            ) + " against the one-shot masks (a block's summed magnitudes move slowly), so the SR-STE rows "
            "measure the pattern more than the training. The engine's f32 kernel runs such layers 4 output "
            "channels at a time and its bf16 kernel on AMX tiles; section `coarse_engine` times these "
            "checkpoints on both against the deployment runtimes. The AMX prototype above is not the "
            "engine's path."
            if trained == "SR-STE"
            else " It is measured here, not offered yet: masks are fixed one-shot (not trained with SR-STE or "
            "SLS's gradient), the prototype runs one conv, and the engine has no coarse path; those are what "
            "adopting it would take."
        ),
    ]
    return "Coarse (block-shared) N:M: the PSNR it costs, the speed it buys", "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--study-dir", type=Path, default=Path("runs/photos-study"), help="bench_photos --work-dir"
    )
    parser.add_argument("--data", type=Path, default=Path("data/photos"))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--budgets", type=lambda s: tuple(s.split(",")), default=BUDGETS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the speed rows")
    parser.add_argument("--no-speed", action="store_true", help="PSNR only")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="keep the committed PSNR rows, measure the speed rows again (no photo study needed)",
    )
    return section_main(SECTION, render, measure, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
