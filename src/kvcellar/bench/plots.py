"""PNG plots of a benchmark run (matplotlib, headless Agg backend).

Operations: `write_plots(results, out_dir) -> file names`:
- `ttft.png`: TTFT p50 by scenario and mode (grouped bars, log scale; p90 as whiskers);
- `hit_rate.png`: hit rate by scenario, one panel per caching mode, stacked by tier;
- `fetch_split.png`: the main mode's TTFT split into lookup / restore / prefill of the rest (shares).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

_TIER_COLOURS = {"device": "#2a9d8f", "host": "#e9c46a", "disk": "#e76f51", "hf-deepcopy": "#8d99ae"}


def _labels_and_modes(rows: list[dict]) -> tuple[list[str], list[str]]:
    return list(dict.fromkeys(r["label"] for r in rows)), list(dict.fromkeys(r["mode"] for r in rows))


def _ttft(results: dict, path: Path) -> None:
    rows = results["rows"]
    labels, modes = _labels_and_modes(rows)
    index = {(r["label"], r["mode"]): r for r in rows}
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels) + 2), 5))
    for m, mode in enumerate(modes):
        xs = [i + (m - (len(modes) - 1) / 2) * width for i, label in enumerate(labels) if (label, mode) in index]
        found = [index[(label, mode)] for label in labels if (label, mode) in index]
        p50 = [r["ttft_p50_s"] for r in found]
        p90 = [max(r["ttft_p90_s"] - r["ttft_p50_s"], 0) for r in found]
        ax.bar(xs, p50, width, label=mode, yerr=[[0] * len(p90), p90], capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("time to first token, p50 (s; whisker: p90)")
    ax.set_title(f"TTFT by scenario and mode: {results['target']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hit_rate(results: dict, path: Path) -> None:
    rows = [r for r in results["rows"] if r["mode"] != results["baseline_mode"]]
    labels, modes = _labels_and_modes(rows)
    index = {(r["label"], r["mode"]): r for r in rows}
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 0.9 * len(labels) + 2), 1.9 * len(modes) + 1),
                             sharex=True, squeeze=False)  # fmt: skip
    tiers_seen: dict[str, str] = {}
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        bottom = [0.0] * len(labels)
        tiers = sorted({t for r in rows if r["mode"] == mode for t in r["hit_rate_by_tier"]})
        for tier in tiers:
            values = [index[(label, mode)]["hit_rate_by_tier"].get(tier, 0.0) if (label, mode) in index else 0.0
                      for label in labels]  # fmt: skip
            colour = _TIER_COLOURS.get(tier, "#6c757d")
            ax.bar(range(len(labels)), values, 0.6, bottom=bottom, color=colour)
            tiers_seen[tier] = colour
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(mode, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in tiers_seen.values()]
    fig.legend(handles, [f"from {tier}" for tier in tiers_seen], loc="lower center", ncol=max(len(tiers_seen), 1),
               fontsize=8)  # fmt: skip
    fig.suptitle("hit rate (cached / prompt tokens) by scenario, per mode")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fetch_split(results: dict, path: Path) -> None:
    """Shares of TTFT (a linear scale would hide lookup and restore next to a cold prefill)."""
    rows = [r for r in results["rows"] if r["mode"] == results["main_mode"]]
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) + 2), 4.5))
    bottom = [0.0] * len(rows)
    parts = ("lookup", "restore", "prefill")
    totals = [sum(r[f"{part}_p50_s"] for part in parts) or 1.0 for r in rows]
    for part, colour in zip(parts, ("#264653", "#2a9d8f", "#e76f51"), strict=True):
        values = [r[f"{part}_p50_s"] / total for r, total in zip(rows, totals, strict=True)]
        ax.bar(range(len(rows)), values, 0.6, bottom=bottom, label=part, color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ttft_p50_s']:.3g} s", (i, 1.01), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("share of TTFT (p50 of each part)")
    ax.set_title(f"{results['main_mode']}: where TTFT goes (lookup + load / restore / prefill of the rest)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out_dir: Path) -> list[str]:
    """Write the PNGs that have data; returns their file names."""
    written = []
    if results["rows"]:
        _ttft(results, out_dir / "ttft.png")
        written.append("ttft.png")
    if any(r["mode"] != results["baseline_mode"] for r in results["rows"]):
        _hit_rate(results, out_dir / "hit_rate.png")
        written.append("hit_rate.png")
    if any(r["mode"] == results["main_mode"] for r in results["rows"]):
        _fetch_split(results, out_dir / "fetch_split.png")
        written.append("fetch_split.png")
    return written
