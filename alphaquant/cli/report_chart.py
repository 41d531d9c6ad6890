"""report.png: what quantization did to a model, in one picture.

Left: weight SQNR (dB) of every quantized layer as a heat map, one row per block (the layer index
in the module name) and one column per projection (q_proj, k_proj, ..., down_proj), so a weak
block or a weak projection type stands out. Right: linear-weight size before and after, and the
accuracy before and after (perplexity, or cosine similarity to the float model) when evaluated.
"""
from __future__ import annotations

import math
import re

_INDEXED = re.compile(r"^(?P<prefix>.*?)\.?(?P<index>\d+)\.(?P<rest>.+)$")


def layer_grid(layers: list[dict]) -> tuple[list[str], list[str], dict, list[dict]]:
    """(row labels, column labels, {(row, col): layer}, layers without an index) of report layers."""
    cells, loose = {}, []
    prefixes = {}
    for r in layers:
        m = _INDEXED.match(r["name"])
        if m is None:
            loose.append(r)
            continue
        prefixes.setdefault(m["prefix"], len(prefixes))
        cells[(m["prefix"], int(m["index"]), m["rest"])] = r
    rests = list(dict.fromkeys(k[2] for k in cells))
    lasts = [x.rsplit(".", 1)[-1] for x in rests]
    col_label = dict(zip(rests, lasts if len(set(lasts)) == len(lasts) else rests))
    rows = sorted({(prefixes[p], p, i) for p, i, _ in cells})
    row_label = {(p, i): (str(i) if len(prefixes) == 1 else f"{p.rsplit('.', 1)[-1]} {i}") for _, p, i in rows}
    row_keys = [(p, i) for _, p, i in rows]
    grid = {(row_keys.index((p, i)), rests.index(rest)): r for (p, i, rest), r in cells.items()}
    return [row_label[k] for k in row_keys], [col_label[x] for x in rests], grid, loose


def _column_schemes(grid: dict, n_cols: int) -> list[str]:
    out = []
    for c in range(n_cols):
        schemes = {r["scheme"] for (_, cc), r in grid.items() if cc == c}
        out.append(schemes.pop() if len(schemes) == 1 else "mixed")
    return out


def import_in_background() -> None:
    """Import matplotlib on a daemon thread (a quarter to a second of start-up) while a long job
    runs, so that :func:`save_chart` at its end does not wait for it. Python's import locks make
    the later import wait for this one rather than run twice."""
    import threading

    def run():
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception:  # noqa: BLE001  save_chart reports nothing either: the chart is optional
            pass

    threading.Thread(target=run, name="alphaquant-import-matplotlib", daemon=True).start()


def save_chart(report: dict, path: str) -> None:
    """Write the report's picture to ``path`` (PNG); skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    rows, cols, grid, loose = layer_grid(report["layers"])
    n_rows, n_cols = max(len(rows), 1), max(len(cols), 1)
    values = np.full((n_rows, n_cols), np.nan)
    for (r, c), layer in grid.items():
        values[r, c] = layer["sqnr_db"]
    finite = values[np.isfinite(values)]
    values[np.isposinf(values)] = finite.max() if finite.size else 0.0  # exact layers: top of the scale

    fig = plt.figure(figsize=(4.5 + 0.9 * n_cols, max(5.0, 1.6 + 0.24 * n_rows)))
    gs = fig.add_gridspec(2, 2, width_ratios=[max(n_cols, 3), 2.6], hspace=0.45, wspace=0.35)
    ax = fig.add_subplot(gs[:, 0])
    masked = np.ma.masked_invalid(values)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # gray: layer not quantized
    im = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest")
    schemes = _column_schemes(grid, len(cols))
    shared = schemes[0] if len(set(schemes)) == 1 else None
    ax.set_xticks(range(len(cols)))
    # the scheme under each column only when the plan gives columns different schemes
    ax.set_xticklabels(cols if shared else [f"{c}\n" + s.replace(" ", "\n") for c, s in zip(cols, schemes)],
                       fontsize=7, rotation=0 if n_cols <= 8 else 45)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7 if n_rows <= 40 else 5)
    ax.set_ylabel("layer (block index)")
    if n_rows * n_cols <= 400:
        lo, hi = (float(masked.min()), float(masked.max())) if masked.count() else (0.0, 1.0)
        for (r, c), layer in grid.items():
            v = layer["sqnr_db"]
            text = "exact" if v == math.inf else f"{v:.1f}"
            dark = hi > lo and (values[r, c] - lo) / (hi - lo) < 0.6
            ax.text(c, r, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("weight SQNR (dB, higher is better)")
    title = "weight error per layer" + (f" (every layer: {shared})" if shared else "")
    if loose:
        title += "\nnot in the grid: " + ", ".join(
            f"{r['name']} {r['sqnr_db']:.1f} dB" for r in loose[:3]) + (" ..." if len(loose) > 3 else "")
    ax.set_xlabel(title, fontsize=9)

    total = report.get("total", {})
    ax_size = fig.add_subplot(gs[0, 1])
    before, after = total.get("bytes_before", 0) / 2**20, total.get("bytes_after", 0) / 2**20
    bars = ax_size.bar(["float", "quantized"], [before, after], color=["#8c8c8c", "#4472c4"])
    ax_size.bar_label(bars, labels=[f"{before:.3g}", f"{after:.3g}"], fontsize=8)
    ax_size.set_ylabel("MiB of linear weights")
    ratio = before / after if after else float("nan")
    n_weights = sum(math.prod(r["shape"]) for r in report["layers"] if r.get("shape"))
    bits = f", {8 * total.get('bytes_after', 0) / n_weights:.2f} bits/weight" if n_weights else ""
    ax_size.set_title(f"size: {ratio:.2f}x smaller{bits}", fontsize=9)
    ax_size.margins(y=0.15)

    ax_acc = fig.add_subplot(gs[1, 1])
    ev = report.get("eval")
    if ev and "perplexity" in ev.get("before", {}):
        b, a = ev["before"]["perplexity"], ev["after"]["perplexity"]
        bars = ax_acc.bar(["float", "quantized"], [b, a], color=["#8c8c8c", "#ed7d31"])
        ax_acc.bar_label(bars, labels=[f"{b:.2f}", f"{a:.2f}"], fontsize=8)
        ax_acc.set_ylabel("perplexity (lower is better)")
        change = f"{100 * (a - b) / b:+.1f}%, " if b else ""
        ax_acc.set_title(f"perplexity ({change}{ev.get('eval_tokens', '?')} held-out tokens)", fontsize=9)
        ax_acc.margins(y=0.15)
    elif ev and "cosine" in ev.get("after", {}):
        a = ev["after"]["cosine"]
        bars = ax_acc.bar(["quantized"], [a], color=["#ed7d31"])
        ax_acc.bar_label(bars, labels=[f"{a:.4f}"], fontsize=8)
        ax_acc.set_ylim(min(a, 0.9), 1.0)
        ax_acc.set_ylabel("embedding cosine to float")
        ax_acc.set_title("accuracy (1.0 = same as float)", fontsize=9)
    else:
        ax_acc.axis("off")
        ax_acc.text(0.5, 0.5, "not evaluated\n(--no-eval)", ha="center", va="center", fontsize=9)
    # above the heat map's column labels, however many lines they take
    fig.canvas.draw()
    top = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.transFigure.inverted()).y1
    fig.suptitle(report.get("title", "AlphaQuant report"), fontsize=11, y=max(top, 0.9) + 0.01, va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
