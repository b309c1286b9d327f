"""SLS's outputs: the per-layer N table, the N-per-layer chart and the achieved budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nmrestore.cost import CostReport
from nmrestore.errors import SparsityError
from nmrestore.io_atomic import atomic_open
from nmrestore.methods.sls.budget import count_at
from nmrestore.methods.sls.config import SLSConfig
from nmrestore.methods.sls.mask import SLSMask
from nmrestore.sparsity.parametrization import NMMask, dense_weight, nm_layers


def _layer_n(mask: NMMask) -> int:
    return mask.hard_n() if isinstance(mask, SLSMask) else mask.n


def sls_layer_table(model: nn.Module, cost: CostReport | None = None) -> list[dict[str, Any]]:
    """One row per Conv/Linear layer: name, shape, share of the network's MACs, N, M, density.

    Dense layers are listed too (``n``/``m`` None, density 1) so the table shows the whole network.
    """
    report = cost if cost is not None else count_at(model, None)
    masks = {name: mask for name, _, mask in nm_layers(model)}
    total = report.dense_macs or 1
    rows: list[dict[str, Any]] = []
    for layer in report.layers:
        mask = masks.get(layer.name)
        n = None if mask is None else _layer_n(mask)
        m = None if mask is None else mask.m
        rows.append(
            {
                "name": layer.name,
                "shape": tuple(layer.shape),
                "share_of_macs": layer.dense_macs / total,
                "dense_macs": layer.dense_macs,
                "n": n,
                "m": m,
                "density": 1.0 if n is None or m is None else n / m,
                "frozen": None if not isinstance(mask, SLSMask) else mask.is_frozen,
            }
        )
    return rows


def format_sls_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text rendering of :func:`sls_layer_table`."""
    lines = [f"{'layer':<34} {'shape':<16} {'MACs share':>10} {'N:M':>7} {'density':>8}"]
    for row in rows:
        shape = "x".join(str(s) for s in row["shape"])
        nm_text = "dense" if row["n"] is None else f"{row['n']}:{row['m']}"
        lines.append(
            f"{row['name']:<34} {shape:<16} {row['share_of_macs']:>10.1%} {nm_text:>7} {row['density']:>8.3f}"
        )
    eff = sum(row["share_of_macs"] * row["density"] for row in rows)
    lines.append(f"Conv/Linear MACs kept: {eff:.1%} of the network's dense MACs")
    return "\n".join(lines)


def plot_n_per_layer(model: nn.Module, path: str | Path, cost: CostReport | None = None) -> Path:
    """Bar chart of N/M per layer beside each layer's share of MACs, saved as a PNG.

    Uses matplotlib's object API with the Agg canvas, so no global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sls_layer_table(model, cost)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = list(range(len(rows)))
    width = 0.4
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:blue" if row["n"] is not None else "lightgray" for row in rows]
    ax.bar([i - width / 2 for i in x], [row["density"] for row in rows], width, color=colors)
    ax.set_ylabel("N / M")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    shares = [100 * row["share_of_macs"] for row in rows]
    ax2.bar([i + width / 2 for i in x], shares, width, color="tab:orange")
    ax2.set_ylabel("share of dense MACs (%)")
    ax2.set_ylim(0, max(shares, default=1.0) * 1.05 or 1.0)
    ax.set_xticks(x, [row["name"] for row in rows], rotation=90, fontsize=7)
    legend = [
        Patch(color="tab:blue", label="N/M (pruned layer)"),
        Patch(color="lightgray", label="dense layer"),
        Patch(color="tab:orange", label="share of MACs"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8)
    ax.set_title("SLS: learned N per layer vs. share of MACs", fontsize=10)
    with atomic_open(out) as f:
        fig.savefig(f, format="png", dpi=120)
    return out


def achieved_budget(model: nn.Module, config: SLSConfig) -> float:
    """The model's current cost as a fraction of ``config``'s budget reference (compare with budget)."""
    masks = {name: mask for name, _, mask in nm_layers(model)}
    if not masks:
        raise SparsityError("the model has no N:M masks")
    if config.budget_kind == "params":
        params = [
            (dense_weight(module).numel(), _layer_n(mask), mask.m) for _, module, mask in nm_layers(model)
        ]
        total = sum(p for p, _, _ in params)
        return sum(p * n / m for p, n, m in params) / total
    report = count_at(model, config.input_size)
    kept = 0.0
    prunable = 0.0
    for layer in report.layers:
        mask = masks.get(layer.name)
        if mask is None:
            continue
        prunable += layer.dense_macs
        kept += layer.dense_macs * _layer_n(mask) / mask.m
    if config.budget_kind == "macs":
        return (report.dense_macs - prunable + kept) / report.dense_macs
    return kept / prunable if prunable else 1.0
