"""The HTML report of a results database: one self-contained page (images embedded as base64).

Sections, in the order a reader needs them:
1. Overview: one row per method with its mean of every metric, time per image and memory,
   best values highlighted - the at-a-glance comparison.
2. Bar charts of the main metrics per category, and accuracy against speed (for the
   reference setting, vanilla, when the grid has several settings).
2b. Settings (few-shot, noisy, semi-supervised): the metric against the setting's parameter,
   a line per method with its vanilla value dashed, mean and per category, as inline SVG;
   the numbers under each curve; the noisy setting's injected images and how each method
   scored them.
2c. Continual and multi-class (the tasks settings): per continual grid, each method's final
   metrics and forgetting measure, and its task x task accuracy matrix as a heat map (inline
   SVG); per multi-class cell, the unified model beside the method trained per category,
   per category, mean and ADer's mAD.
3. Per-metric tables: categories as rows, methods as columns, a mean row; cells coloured
   from worst to best within the row so the winner of each category stands out.
4. Image ROC curves per category (recomputed from the per-image scores in the database).
5. Time and memory per method.
6. A gallery per method: the highest-scored defects and the worst false alarms, each shown
   as [photo + ground-truth outline | heatmap + outline], with the same colour range within
   a cell.
7. Failed cells with their errors and tracebacks.

Plots are drawn with matplotlib's Agg backend (no display needed): PNG, or SVG inline for
the settings curves; nothing is loaded from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import iadkit
from iadkit.bench.db import ResultsDB
from iadkit.bench.summary import (
    METRICS,
    REFERENCE_SETTING,
    TASK_METRICS,
    TIMINGS,
    MetricTable,
    SettingCurve,
    TaskCellSummary,
    cost_table,
    fmt_metric,
    fmt_timing,
    is_nan,
    method_label,
    metric_tables,
    operating_tables,
    row_label,
    setting_curves,
    setting_label,
    settings_overview,
    task_summaries,
    unified_comparisons,
)

MAIN_METRICS = ("image_auroc", "pixel_auroc", "aupro")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:0;color:#b9c2d0;font-size:13px}
nav{background:#fff;border-bottom:1px solid #dde1e7;padding:8px 32px;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#2b5ea7;text-decoration:none;font-size:14px}
main{padding:8px 32px 40px;max-width:1500px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 12px} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #e3e6eb;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#eef1f5;font-weight:600} td.l,th.l{text-align:left}
tr.mean td{border-top:2px solid #8a94a6;font-weight:600}
td.best{font-weight:700;outline:2px solid #1a7f37;outline-offset:-2px}
.note{color:#5b6474;font-size:12px} .warn{color:#9a3b00;font-size:13px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:4px 0}
.card{background:#f0f4fa;border-radius:6px;padding:8px 14px;font-size:13px}
.card b{display:block;font-size:18px}
img.plot{max-width:100%;height:auto}
.curves svg{max-width:100%;height:auto;display:block} td.ref{color:#5b6474;font-style:italic}
.gallery{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 10px}
figure{margin:0;background:#fafbfc;border:1px solid #e3e6eb;border-radius:4px;padding:4px}
figure img{display:block;image-rendering:pixelated;width:256px;height:auto}
figcaption{font-size:11px;color:#3a4352;max-width:256px;overflow-wrap:anywhere}
figure.defect{border-top:3px solid #b42318} figure.false_alarm{border-top:3px solid #d18b00}
details{margin:6px 0} summary{cursor:pointer;font-weight:600;font-size:14px}
pre{background:#f4f4f4;padding:8px;overflow-x:auto;font-size:11px;max-height:300px}
"""


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_b64(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _png_b64(buf.getvalue())


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _shade(v: float, lo: float, hi: float) -> str:
    """Background colour from red (at `lo`, the worst in the row) through yellow to green (at
    `hi`, the best); `lo` > `hi` for a measure where lower is better."""
    if is_nan(v) or hi == lo:
        return ""
    from matplotlib import colormaps

    t = (v - lo) / (hi - lo)
    r, g, b, _ = colormaps["RdYlGn"](0.15 + 0.7 * t)
    mix = lambda c: round(255 * (0.55 * float(c) + 0.45))  # float(): colormaps give numpy scalars
    return f"background:rgb({mix(r)},{mix(g)},{mix(b)})"


def _metric_table_html(t: MetricTable) -> str:
    out = [f'<table class="metric" data-metric="{_esc(t.metric)}" data-setting="{_esc(t.setting)}">']
    out.append(
        '<tr><th class="l">dataset / category</th>' + "".join(f"<th>{_esc(m)}</th>" for m in t.methods) + "</tr>"
    )
    for label, values in [*t.rows, ("mean", t.mean)]:
        vals = [v for v in values.values() if not is_nan(v)]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
        if t.lower_is_better:  # colour and outline the lowest value as the best
            lo, hi = hi, lo
        top = (min(vals) if t.lower_is_better else max(vals)) if vals else None
        cls = ' class="mean"' if label == "mean" else ""
        cells = []
        for m in t.methods:
            v = values[m]
            mark = "†" if label == "mean" and m in t.incomplete else ""
            c = ' class="best"' if top is not None and v == top and len(vals) > 1 else ""
            cells.append(f'<td{c} style="{_shade(v, lo, hi)}">{fmt_metric(v)}{mark}</td>')
        out.append(f'<tr{cls}><td class="l">{_esc(label)}</td>{"".join(cells)}</tr>')
    out.append("</table>")
    if t.incomplete:
        out.append(
            '<p class="note">† mean over fewer categories (a cell failed, or the method does not produce that metric, e.g. pixel metrics of image-level CutPaste): not comparable with the others.</p>'
        )
    return "\n".join(out)


def _overview_html(tables: list[MetricTable], costs: dict[str, Any], setting: str) -> str:
    ts = [t for t in tables if t.setting == setting]
    if not ts:
        return ""
    methods = list(dict.fromkeys(m for t in ts for m in t.methods))
    first = next((t for t in ts if t.metric == "image_auroc"), ts[0])
    methods.sort(key=lambda m: -first.mean.get(m, -1) if not is_nan(first.mean.get(m, float("nan"))) else 1)
    cost_keys = ["fit_seconds", "seconds_per_image", "fit_peak_rss_mb"]
    out = [f'<table class="overview" data-setting="{_esc(setting)}"><tr><th class="l">method</th>']
    out += [f"<th>{_esc(t.title)}</th>" for t in ts] + [f"<th>{TIMINGS[k][0]}</th>" for k in cost_keys] + ["</tr>"]
    for m in methods:
        row = [f'<tr><td class="l"><b>{_esc(m)}</b></td>']
        for t in ts:
            col = [t.mean.get(x, float("nan")) for x in methods]
            vals = [v for v in col if not is_nan(v)]
            v = t.mean.get(m, float("nan"))
            best = (not is_nan(v)) and vals and v == max(vals) and len(vals) > 1
            mark = "†" if m in t.incomplete else ""
            style = _shade(v, min(vals), max(vals)) if vals else ""
            row.append(f'<td{" class=best" if best else ""} style="{style}">{fmt_metric(v)}{mark}</td>')
        c = costs.get(m)
        for k in cost_keys:
            row.append(f"<td>{fmt_timing(k, c.values.get(k, float('nan'))) if c else '–'}</td>")
        out.append("".join(row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _bar_chart(tables: list[MetricTable], setting: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ts = [t for t in tables if t.setting == setting and t.metric in MAIN_METRICS]
    if not ts:
        return None
    fig, axes = plt.subplots(len(ts), 1, figsize=(max(7, 1.3 * len(ts[0].rows) + 4), 2.9 * len(ts)), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(ts[0].methods) <= 10 else "tab20")
    for ax, t in zip(axes[:, 0], ts):
        labels = [r for r, _ in t.rows] + ["mean"]
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(t.methods))
        for j, m in enumerate(t.methods):
            vals = [vals[m] for _, vals in t.rows] + [t.mean[m]]
            ax.bar(
                x + (j - (len(t.methods) - 1) / 2) * width,
                [0 if is_nan(v) else v for v in vals],
                width,
                label=m,
                color=cmap(j % cmap.N),
            )
        finite = [v for _, vals in t.rows for v in vals.values() if not is_nan(v)]
        lo = max(0.0, min(finite) - 0.05) if finite else 0.0
        ax.set_ylim(lo if lo > 0.3 else 0.0, 1.0)
        ax.set_xticks(x, [lbl.split(" / ")[-1] if lbl != "mean" else "MEAN" for lbl in labels], fontsize=8)
        ax.set_ylabel(t.title)
        ax.axvline(len(labels) - 1.5, color="#999", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(6, len(ts[0].methods)), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02))
    fig.tight_layout()
    return _fig_b64(fig)


def _speed_plot(tables: list[MetricTable], costs: dict[str, Any], setting: str) -> str | None:
    import matplotlib.pyplot as plt

    t = next((t for t in tables if t.setting == setting and t.metric == "image_auroc"), None)
    if t is None:
        return None
    pts = [
        (
            m,
            costs[m].values.get("seconds_per_image", float("nan")) * 1000,
            t.mean[m],
            costs[m].values.get("fit_seconds", float("nan")),
        )
        for m in t.methods
        if m in costs and not is_nan(t.mean[m])
    ]
    pts = [p for p in pts if not is_nan(p[1])]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for m, ms, auroc, fit_s in pts:
        ax.scatter(ms, auroc, s=30 + 4 * (0 if is_nan(fit_s) else min(fit_s, 200)), alpha=0.7)
        ax.annotate(m, (ms, auroc), fontsize=8, xytext=(4, 3), textcoords="offset points")
    times = [p[1] for p in pts]
    if max(times) > 10 * min(times) > 0:
        ax.set_xscale("log")
        ax.set_xlabel("time per image (ms, log scale)")
    else:
        ax.set_xlabel("time per image (ms)")
    ax.set_ylabel("mean I-AUROC")
    ax.set_title("accuracy vs speed (marker size ~ fit time)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_b64(fig)


def _roc_plot(db: ResultsDB, runs: list[dict[str, Any]], setting: str) -> str | None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    done = [r for r in runs if r["status"] == "done" and setting_label(r) == setting]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        groups[row_label(r)].append(r)
    if not groups:
        return None
    methods = list(dict.fromkeys(method_label(r, runs) for r in done))
    colour = {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i % 20) for i, m in enumerate(methods)}
    ncol = min(4, len(groups))
    nrow = math.ceil(len(groups) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (label, rs) in zip(axes.ravel(), groups.items()):
        seen = set()
        for r in rs:
            m = method_label(r, runs)
            if m in seen:  # several seeds: plot the first one
                continue
            seen.add(m)
            s = db.image_scores(r["cell_id"])
            if len(set(s["labels"].tolist())) < 2:
                continue
            fpr, tpr, _ = roc_curve(s["labels"], s["scores"])
            auc = r["metrics"].get("image_auroc", float("nan"))
            ax.plot(fpr, tpr, lw=1.3, color=colour[m], label=f"{m} {fmt_metric(auc)}")
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls=":")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes.ravel()[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    return _fig_b64(fig)


def _cost_html(costs: list[Any]) -> str:
    keys = [k for k in TIMINGS if any(k in c.values for c in costs)]
    out = [
        '<table class="cost"><tr><th class="l">method</th><th>cells</th>'
        + "".join(f"<th>{TIMINGS[k][0]}</th>" for k in keys)
        + "</tr>"
    ]
    for c in costs:
        out.append(
            f'<tr><td class="l">{_esc(c.method)}</td><td>{c.n_cells}</td>'
            + "".join(f"<td>{fmt_timing(k, c.values.get(k, float('nan')))}</td>" for k in keys)
            + "</tr>"
        )
    out.append("</table>")
    out.append(
        '<p class="note">Means over each method\'s finished cells. Time per image: wall time of the whole test pass '
        "(decoding, preprocessing, model, post-processing) / images, as IM-IAD measures it; model time excludes data "
        "loading. Peak RSS: the process's resident memory at its highest during fit or test (includes the interpreter "
        "and libraries, about the same for every method).</p>"
    )
    return "\n".join(out)


def _gallery_html(db: ResultsDB, runs: list[dict[str, Any]]) -> str:
    done = [r for r in runs if r["status"] == "done"]
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        by_method[method_label(r, runs)].append(r)
    out = []
    for i, (m, rs) in enumerate(by_method.items()):
        parts = []
        for r in rs:
            ovs = db.overlays(r["cell_id"])
            if not ovs:
                continue
            figs = []
            for o in ovs:
                what = f"defect: {o.defect_type}" if o.kind == "defect" else "good part (false alarm)"
                caption = f"#{o.rank + 1} {what} · score {o.score:.4g}<br>{_esc(Path(o.path).name)}"
                figs.append(
                    f'<figure class="{o.kind}"><img alt="{_esc(o.kind)} {_esc(o.path)}" src="{_png_b64(o.png)}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
            seed = f" · seed {r['seed']}" if len({x["seed"] for x in rs}) > 1 else ""
            parts.append(
                f"<h3>{_esc(row_label(r))} · {_esc(setting_label(r))}{seed}</h3>"
                f'<div class="gallery" data-method="{_esc(m)}">{"".join(figs)}</div>'
            )
        if parts:
            out.append(f"<details{' open' if i == 0 else ''}><summary>{_esc(m)}</summary>{''.join(parts)}</details>")
    if not out:
        return '<p class="note">No overlays stored (gallery_size was 0, or no cell finished).</p>'
    legend = (
        '<p class="note">Left: the test image with the ground-truth outline (white). Right: the anomaly map over it '
        "(colour range fixed per cell: the median good pixel shows no colour, the 99.9th percentile of all test pixels "
        'is red). <span style="color:#b42318">Red border</span>: the highest-scored defective images. '
        '<span style="color:#d18b00">Amber border</span>: the highest-scored good images, i.e. the worst false alarms.</p>'
    )
    return legend + "\n".join(out)


def _failed_html(runs: list[dict[str, Any]]) -> str:
    failed = [r for r in runs if r["status"] != "done"]
    if not failed:
        return '<p class="note">None.</p>'
    out = [
        '<table class="failed"><tr><th class="l">method</th><th class="l">dataset / category</th><th class="l">setting</th><th>seed</th><th class="l">status</th><th class="l">error</th></tr>'
    ]
    for r in failed:
        err = r.get("error") or (
            "interrupted (still 'running': rerun the benchmark)" if r["status"] == "running" else ""
        )
        out.append(
            f'<tr><td class="l">{_esc(r["method"])}</td><td class="l">{_esc(row_label(r))}</td><td class="l">{_esc(setting_label(r))}</td>'
            f'<td>{r["seed"]}</td><td class="l">{_esc(r["status"])}</td><td class="l">{_esc(err)}</td></tr>'
        )
    out.append("</table>")
    for r in failed:
        if r.get("traceback"):
            out.append(
                f"<details><summary>traceback: {_esc(r['method'])} · {_esc(row_label(r))}</summary><pre>{_esc(r['traceback'])}</pre></details>"
            )
    return "\n".join(out)


def _operating_html(runs: list[dict[str, Any]]) -> str:
    """The operating point: what each model's own threshold (calibrated on held-out good
    training images for a 1 % false-alarm target) does on the test set."""
    tables = operating_tables(runs)
    out = ['<section id="operating"><h2>At the calibrated threshold</h2>']
    if not tables:
        out.append(
            '<p class="note">No cell has a threshold (each needs at least 10 good training images left after holding 10 % out).</p></section>'
        )
        return "\n".join(out)
    out.append(
        '<p class="note">Each model set its own threshold on good training images it did not learn from '
        "(10 % held out, target false-alarm rate 1 %), as `iadkit fit` does. False alarms: share of good test "
        "parts flagged; misses: share of defective test parts passed. Lower is better; a line engineer's "
        "first question. The threshold values themselves are not comparable across methods.</p>"
    )
    for t in tables:
        out.append(f"<h3>{_esc(t.title)} · {_esc(t.setting)}</h3>{_metric_table_html(t)}")
    thresholds = [
        (r["method"], row_label(r), r["operating_point"])
        for r in runs
        if r["status"] == "done" and r.get("operating_point")
    ]
    rows = "".join(
        f'<tr><td class="l">{_esc(m)}</td><td class="l">{_esc(lbl)}</td><td>{op["threshold"]:.4g}</td>'
        f"<td>{op.get('n_calibration') or '–'}</td></tr>"
        for m, lbl, op in thresholds
    )
    out.append(
        "<details><summary>thresholds per cell (and how many held-out images set each)</summary>"
        '<table><tr><th class="l">method</th><th class="l">dataset / category</th><th>threshold</th>'
        f"<th>calibration images</th></tr>{rows}</table></details></section>"
    )
    return "\n".join(out)


def build_report_html(db_path: str | Path) -> str:
    """The report page as a string (used by `write_report`, and by tests)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    db_path = Path(db_path)
    with ResultsDB(db_path, writable=False) as db:
        runs = db.runs()
        meta = db.meta()
        tables = metric_tables(runs)
        costs = {c.method: c for c in cost_table(runs)}
        settings = list(dict.fromkeys(t.setting for t in tables))
        n_done = sum(r["status"] == "done" for r in runs)
        n_failed = sum(r["status"] == "failed" for r in runs)
        n_running = sum(r["status"] == "running" for r in runs)
        methods = sorted({r["method"] for r in runs})
        datasets = sorted({r["dataset_label"] for r in runs})
        versions = sorted({r["iadkit_version"] for r in runs})
        body: list[str] = []
        cards = [
            ("cells done", n_done),
            ("failed", n_failed),
            ("methods", len(methods)),
            ("categories", len({row_label(r) for r in runs})),
            ("seeds", len({r["seed"] for r in runs})),
        ]
        if n_running:
            cards.append(("interrupted", n_running))
        card_html = "".join(f'<div class="card"><b>{v}</b>{_esc(k)}</div>' for k, v in cards)
        body.append(f'<section id="overview"><h2>Overview</h2><div class="cards">{card_html}</div>')
        body.append(f'<p class="note">datasets: {_esc(", ".join(datasets))}</p>')
        if any("subsample" in d for d in datasets):
            body.append(
                '<p class="warn">Datasets marked * were subsampled for a quick run (sizes above): '
                "their numbers are not the full protocol.</p>"
            )
        if len(settings) > 1:
            body.append(_settings_overview_html(runs))
        for s in settings:
            if len(settings) > 1:
                body.append(f"<h3>setting: {_esc(s)}</h3>")
            body.append(_overview_html(tables, costs, s))
        body.append(
            '<p class="note">Means over categories (and seeds). Best per column outlined; colours run from the worst '
            "(red) to the best (green) method in each column. I-: image level, P-: pixel level; AUPRO integrates the "
            "per-region overlap up to a false-positive rate of 0.3 (normalised to [0, 1]).</p></section>"
        )
        # With several settings, the per-category charts show the reference setting; the
        # settings section below draws every setting against it.
        charted = (
            settings if len(settings) <= 1 else [REFERENCE_SETTING if REFERENCE_SETTING in settings else settings[0]]
        )
        body.append('<section id="charts"><h2>Charts</h2>')
        for s in charted:
            if len(settings) > 1:
                body.append(f"<h3>setting: {_esc(s)}</h3>")
            for img in (_bar_chart(tables, s), _speed_plot(tables, costs, s)):
                if img:
                    body.append(f'<img class="plot" src="{img}" alt="chart">')
        body.append("</section>")
        settings_section = _settings_html(db, runs)
        body.append(settings_section)
        tasks_section = _tasks_html(db, runs)
        body.append(tasks_section)
        body.append('<section id="tables"><h2>Every metric, per category</h2>')
        for t in tables:
            body.append(f"<h3>{_esc(t.title)} · {_esc(t.setting)}</h3>{_metric_table_html(t)}")
        if not tables:
            body.append('<p class="note">No finished cell yet.</p>')
        body.append("</section>")
        body.append('<section id="roc"><h2>Image ROC curves</h2>')
        for s in charted:
            img = _roc_plot(db, runs, s)
            if img:
                body.append(f'<img class="plot" src="{img}" alt="ROC curves {_esc(s)}">')
        body.append("</section>")
        body.append(_operating_html(runs))
        body.append(f'<section id="cost"><h2>Time and memory</h2>{_cost_html(list(costs.values()))}</section>')
        gallery_note = ""
        if len(settings) > 1:  # a gallery per setting would multiply the page's size
            gallery_note = f'<p class="note">Setting {_esc(charted[0])} only (the other settings\' overlays are in the results database).</p>'
        gallery = _gallery_html(db, [r for r in runs if len(settings) <= 1 or setting_label(r) in charted])
        body.append(f'<section id="gallery"><h2>Gallery</h2>{gallery_note}{gallery}</section>')
        body.append(f'<section id="failed"><h2>Failed or interrupted cells</h2>{_failed_html(runs)}</section>')
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = "iadkit benchmark report"
    nav = "".join(
        f'<a href="#{a}">{n}</a>'
        for a, n in [("overview", "Overview"), ("charts", "Charts")]
        + ([("settings", "Settings")] if settings_section else [])
        + ([("tasks", "Continual & multi-class")] if tasks_section else [])
        + [
            ("tables", "Tables"),
            ("roc", "ROC"),
            ("operating", "Threshold"),
            ("cost", "Time & memory"),
            ("gallery", "Gallery"),
            ("failed", "Failures"),
        ]
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body>'
        f"<header><h1>{title}</h1><p>{_esc(db_path.name)} · {n_done} cells · iadkit {_esc(', '.join(versions) or iadkit.__version__)}"
        f" · generated {generated} · results schema {_esc(meta.get('schema_version', '?'))}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>"
    )


def write_report(db_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and return its path."""
    from iadkit.files import atomic_write_text

    page = build_report_html(db_path)
    path = atomic_write_text(Path(out_dir) / "index.html", page)
    path.chmod(0o644)  # a report is meant to be shared (the temp file was private)
    return path


# -- settings: curves against shots, noise ratio and labelled anomalies ------------------------
CURVE_METRICS = ("image_auroc", "pixel_auroc")


def _curve_svg(curves: list[SettingCurve]) -> str:
    """One figure per setting as inline SVG: a row per metric, a panel for the mean over
    categories and one per category; a line per series in its method's colour (a method's
    second variant, e.g. with augmentation, dotted with square markers), the method's vanilla
    value as a thin dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    first = curves[0]
    columns = ["mean", *first.rows]
    fig, axes = plt.subplots(
        len(curves), len(columns), figsize=(2.9 * len(columns), 2.5 * len(curves) + 0.5), squeeze=False
    )
    series = list(dict.fromkeys(s for c in curves for s in c.series))
    method_of = {s: m for c in curves for s, m in c.method_of.items()}
    methods = list(dict.fromkeys(method_of[s] for s in series))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    variant = {s: [x for x in series if method_of[x] == method_of[s]].index(s) for s in series}
    styles = [("-", "o"), (":", "s"), ("-.", "^"), ((0, (1, 3)), "D")]
    handles: dict[str, Any] = {}
    for r, curve in enumerate(curves):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            drawn = False
            for s in curve.series:
                m = curve.method_of[s]
                per_x = curve.mean.get(s, {}) if col == "mean" else curve.values.get((s, col), {})
                ref = (
                    curve.mean_reference.get(m, float("nan"))
                    if col == "mean"
                    else curve.reference.get((m, col), float("nan"))
                )
                pts = [(x, per_x[x]) for x in curve.xs if x in per_x and not is_nan(per_x[x])]
                if curve.setting == "noisy" and pts and not is_nan(ref):
                    pts = [(0.0, ref), *pts]  # noise ratio 0 is vanilla
                if pts:
                    xs, ys = zip(*pts)
                    ls, marker = styles[variant[s] % len(styles)]
                    (line,) = ax.plot(xs, ys, ls=ls, marker=marker, ms=3.5, lw=1.6, color=colour[m], label=s)
                    handles.setdefault(s, line)
                    drawn = True
                if pts and not is_nan(ref):
                    ax.axhline(ref, color=colour[m], ls="--", lw=0.9, alpha=0.7)
            ticks = ([0.0] if curve.setting == "noisy" else []) + curve.xs
            if curve.setting == "few_shot" and min(curve.xs) > 0 and max(curve.xs) / min(curve.xs) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if not drawn:  # e.g. pixel metrics of a dataset without masks
                ax.set_yticks([])
                ax.text(
                    0.5,
                    0.5,
                    f"no {curve.title}",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=8,
                    color="#777",
                )
            if r == 0:
                ax.set_title(f"mean over {len(curve.rows)} categories" if col == "mean" else col, fontsize=9)
            if c == 0:
                ax.set_ylabel(curve.title, fontsize=8)
            if r == len(curves) - 1:
                ax.set_xlabel(curve.axis_label, fontsize=7)
    labels = list(handles)
    if labels:
        ref_handle = plt.Line2D([], [], color="#555", ls="--", lw=0.9)
        fig.legend(
            [handles[s] for s in labels] + [ref_handle],
            [*labels, "vanilla (the method's colour)"],
            loc="upper center",
            ncol=min(5, len(labels) + 1),
            fontsize=8,
            frameon=False,
        )
    rows_of_legend = -(-(len(labels) + 1) // 5)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 + 0.22 * rows_of_legend) / fig.get_figheight()))
    return _fig_svg(fig, salt=f"curves-{first.setting}")


def _fig_svg(fig: Any, *, salt: str) -> str:
    """A matplotlib figure as an inline <svg> element (text kept as text; element ids salted
    per figure so that several figures on one page never share an id)."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate
    # matplotlib numbers its element ids per figure (figure_1, axes_1 ...): prefix them, and
    # every reference to them, so that figures inlined in one page stay distinct.
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", salt) + "-"
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    return text[text.index("<svg") :]


def _curve_table_html(curve: SettingCurve, row: str | None = None) -> str:
    """The numbers under a curve: a row per series, the vanilla reference, then a column
    per parameter value (the survey's table layout); `row` None = the mean over categories."""
    attrs = f'data-setting="{_esc(curve.setting)}" data-metric="{_esc(curve.metric)}" data-row="{_esc(row or "mean")}"'
    out = [f'<table class="curve" {attrs}><tr><th class="l">method</th><th>vanilla</th>']
    out += [f"<th>{_esc(curve.axis)}={x:g}</th>" for x in curve.xs] + ["</tr>"]
    for s in curve.series:
        m = curve.method_of[s]
        ref = curve.mean_reference.get(m, float("nan")) if row is None else curve.reference.get((m, row), float("nan"))
        per_x = curve.mean.get(s, {}) if row is None else curve.values.get((s, row), {})
        cells = []
        for x in curve.xs:
            v = per_x.get(x, float("nan"))
            mark = "†" if row is None and x in curve.incomplete.get(s, set()) else ""
            cells.append(f"<td>{fmt_metric(v)}{mark}</td>")
        out.append(f'<tr><td class="l">{_esc(s)}</td><td class="ref">{fmt_metric(ref)}</td>{"".join(cells)}</tr>')
    out.append("</table>")
    return "".join(out)


def _injected_html(db: ResultsDB, runs: list[dict[str, Any]]) -> str:
    """The noisy setting's disguised defects and how each fitted method scored them: the
    share of the cell's good test parts that score below the injected image (1.00: it still
    looks like a defect to the method, which resisted the noise; near 0: it scores like the
    images the method learnt from, it absorbed the defect). ⚑: above the method's own
    threshold. Images that fell in the calibration hold-out were not trained on: listed, but
    left out of the means."""
    noisy = [
        r
        for r in runs
        if r["status"] == "done" and r["setting"] == "noisy" and (r.get("setting_info") or {}).get("injected")
    ]
    if not noisy:
        return ""
    by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in noisy:
        by_row[row_label(r)].append(r)
    summary: dict[tuple[str, str, float], list[float]] = defaultdict(list)  # (method, row, ratio) -> shares
    details = []
    for row, rs in by_row.items():
        columns = sorted(
            {(method_label(r, runs), float(r["setting_params"].get("ratio", float("nan")))) for r in rs},
            key=lambda c: (c[0], c[1]),
        )
        images: dict[str, dict[str, Any]] = {}
        cell_of: dict[tuple[str, float], dict[str, Any]] = {}
        for r in rs:
            key = (method_label(r, runs), float(r["setting_params"].get("ratio", float("nan"))))
            s = db.image_scores(r["cell_id"])
            good = s["scores"][s["labels"] == 0]
            entries = {}
            for item in r["setting_info"]["injected"]:
                share = float(np.mean(good < item["score"])) if len(good) else float("nan")
                entries[item["path"]] = (share, item.get("flagged"), item.get("role"))
                images.setdefault(item["path"], {"defect_type": item.get("defect_type", ""), "first": key[1]})
                images[item["path"]]["first"] = min(images[item["path"]]["first"], key[1])
                if item.get("role") != "calibration":
                    summary[(key[0], row, key[1])].append(share)
            cell_of[key] = entries
        head = "".join(f"<th>{_esc(m)}<br>ratio {x:g}</th>" for m, x in columns)
        lines = []
        for path, meta in sorted(images.items(), key=lambda kv: (kv[1]["first"], kv[0])):
            cells = []
            for col in columns:
                share, flagged, role = cell_of.get(col, {}).get(path, (float("nan"), None, None))
                tag = (" ⚑" if flagged else "") + (" (held out)" if role == "calibration" else "")
                cells.append(f"<td>{fmt_metric(share)}{tag}</td>")
            lines.append(
                f'<tr><td class="l">{_esc("/".join(Path(path).parts[-2:]))}</td><td class="l">{_esc(meta["defect_type"])}</td>'
                f"<td>{meta['first']:g}</td>{''.join(cells)}</tr>"
            )
        details.append(
            f"<details><summary>{_esc(row)}: {len(images)} injected images</summary>"
            f'<table class="injected" data-row="{_esc(row)}"><tr><th class="l">image</th><th class="l">defect</th>'
            f"<th>from ratio</th>{head}</tr>{''.join(lines)}</table></details>"
        )
    methods = sorted({m for m, _, _ in summary})
    ratios = sorted({x for _, _, x in summary})
    rows_html = []
    for m in methods:
        vals = []
        for x in ratios:
            per_row = [float(np.mean(v)) for (mm, _, xx), v in summary.items() if mm == m and xx == x and v]
            vals.append(f"<td>{fmt_metric(float(np.mean(per_row)) if per_row else float('nan'))}</td>")
        rows_html.append(f'<tr><td class="l">{_esc(m)}</td>{"".join(vals)}</tr>')
    overview = (
        '<table class="injected-summary"><tr><th class="l">method</th>'
        + "".join(f"<th>ratio {x:g}</th>" for x in ratios)
        + "</tr>"
        + "".join(rows_html)
        + "</table>"
    )
    return (
        "<h3>noisy: the injected images</h3>"
        '<p class="note">Each injected image was a defective test part handed to the method as good. Below: the share '
        "of the cell's good test parts that score lower than it (mean over the injected images the method trained "
        "on, then over categories). 1.00: the method still ranks it above every good part (it resisted the noise); "
        "near 0: it scores like the images the method learnt from (it learnt the defect as normal). ⚑: above the "
        "method's own threshold; (held out): the image fell in the calibration hold-out, not in training, and is "
        "left out of the means.</p>" + overview + "".join(details)
    )


def _settings_html(db: ResultsDB, runs: list[dict[str, Any]]) -> str:
    """The settings section: per setting, its curves (SVG) and the numbers under them."""
    curves = setting_curves(runs, CURVE_METRICS)
    if not curves:
        return ""
    out = [
        '<section id="settings"><h2>Settings: shots, noise, labelled anomalies</h2>',
        '<p class="note">The survey\'s manufacturing settings, as its benchmark (IM-IAD) runs them. Few-shot: k good '
        "training images per category. Noisy: defective test images join the training set labelled good, at a ratio "
        "of the clean training count (at most 75 % of a category's test anomalies), and leave the test set. "
        "Semi-supervised: k labelled defects per category move from test to training (same cap); a method that "
        "cannot use labels trains on the good images only. Lines: one per method; dashed: the same method in the "
        "vanilla setting. † a mean over fewer categories.</p>",
    ]
    by_setting: dict[str, list[SettingCurve]] = defaultdict(list)
    for c in curves:
        by_setting[c.setting].append(c)
    names = {"few_shot": "few-shot", "noisy": "noisy training data", "semi_supervised": "semi-supervised"}
    for setting, cs in by_setting.items():
        out.append(f"<h3>{_esc(names.get(setting, setting))}: metric against {_esc(cs[0].axis_label)}</h3>")
        out.append(f'<div class="curves" data-setting="{_esc(setting)}">{_curve_svg(cs)}</div>')
        for c in cs:
            out.append(f'<p class="note">{_esc(c.title)}, mean over categories</p>{_curve_table_html(c)}')
            per_row = "".join(f"<h4>{_esc(row)}</h4>{_curve_table_html(c, row)}" for row in c.rows)
            out.append(f"<details><summary>{_esc(c.title)} per category</summary>{per_row}</details>")
        if setting == "noisy":
            out.append(_injected_html(db, runs))
    out.append("</section>")
    return "\n".join(out)


def _settings_overview_html(runs: list[dict[str, Any]]) -> str:
    """Each setting's mean I-AUROC per method: a row per setting (the leaderboard's summary)."""
    ov = settings_overview(runs, "image_auroc")
    if ov is None:
        return ""
    out = [f'<table class="settings-overview" data-metric="{ov.metric}"><tr><th class="l">setting</th>']
    out += [f"<th>{_esc(m)}</th>" for m in ov.methods] + ["</tr>"]
    for s in ov.settings:
        vals = ov.values[s]
        finite = [v for v in vals.values() if not is_nan(v)]
        cells = []
        for m in ov.methods:
            v = vals[m]
            best = len(finite) > 1 and not is_nan(v) and v == max(finite)
            mark = "†" if (s, m) in ov.incomplete else ""
            cells.append(f"<td{' class=best' if best else ''}>{fmt_metric(v)}{mark}</td>")
        out.append(f'<tr><td class="l">{_esc(s)}</td>{"".join(cells)}</tr>')
    out.append("</table>")
    return f"<h3>{_esc(ov.title)} by setting (mean over categories)</h3>" + "".join(out)


# -- tasks settings: continual (accuracy matrices, forgetting) and multi-class ----------------
def _heatmap_svg(summaries: list[TaskCellSummary], metric: str, salt: str) -> str:
    """The task x task matrix a[l][j] of `metric` of each cell as a heat map (rows: after
    training step l, columns: tested on task j; blank where the task was not yet learned),
    one panel per cell, the values written in the squares."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(summaries)
    size = max(len(s.tasks) for s in summaries)
    width = max(2.6, 0.55 * size + 1.4)
    fig, axes = plt.subplots(1, n, figsize=(width * n, width * 0.9 + 0.4), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        grid = s.matrix.metric(metric)
        ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="equal")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7 if size <= 6 else 5)
        ax.set_xticks(range(len(s.tasks)), s.tasks, rotation=45, ha="right", fontsize=7)
        square = s.matrix.n_steps == len(s.tasks)
        ax.set_yticks(
            range(s.matrix.n_steps),
            [f"after {s.tasks[i] if square else i + 1}" for i in range(s.matrix.n_steps)],
            fontsize=7,
        )
        ax.set_ylabel("trained up to", fontsize=7)
        fm = s.forgetting.get(metric, float("nan"))
        ax.set_title(f"{s.method}\nFM {fmt_metric(fm)}", fontsize=8)
        ax.set_xlabel("tested on task", fontsize=7)
    fig.tight_layout()
    return _fig_svg(fig, salt=salt)


def _tasks_html(db: ResultsDB, runs: list[dict[str, Any]]) -> str:
    """The continual and multi-class section (empty when the grid has neither)."""
    summaries = task_summaries(db, runs)
    comparisons = unified_comparisons(db, runs)
    if not summaries:
        return ""
    out = ['<section id="tasks"><h2>Continual and multi-class</h2>']
    continual = [s for s in summaries if s.setting != "multi_class"]
    if continual:
        out.append(
            "<h3>Continual: learning products one after the other</h3>"
            '<p class="note">The tasks (categories, or groups joined by +) are learned in the order shown; after each '
            "training step every task learned so far is tested, which fills the lower triangle of the accuracy matrix "
            "a[l][j] (row: after step l, column: task j). Final = the last row; FM = forgetting measure "
            "1/(T-1) &Sigma;<sub>j&lt;T</sub> max<sub>l&lt;T</sub>(a<sub>l,j</sub> - a<sub>T,j</sub>), how much the "
            "final model lost on the earlier tasks (lower is better). A continual method learns each task with "
            "partial_fit; any other method is trained task after task from its previous state (naive sequential "
            "fine-tuning: the forgetting baseline).</p>"
        )
        by_setting: dict[tuple[str, str], list[TaskCellSummary]] = defaultdict(list)
        for s in continual:
            by_setting[(s.row, s.setting_label)].append(s)
        for (row, label), group in by_setting.items():
            out.append(f"<h4>{_esc(row)} · {_esc(label)} · tasks: {_esc(' → '.join(group[0].tasks))}</h4>")
            out.append('<table class="forgetting"><tr><th class="l">method</th><th class="l">training</th>')
            for k in TASK_METRICS:
                out.append(f"<th>final {_esc(METRICS.get(k, k))}</th><th>FM {_esc(METRICS.get(k, k))}</th>")
            out.append("</tr>")
            for s in group:
                seed = f" (seed {s.seed})" if len({x.seed for x in group}) > 1 else ""
                cells = "".join(
                    f"<td>{fmt_metric(s.final_mean.get(k, float('nan')))}</td><td>{fmt_metric(s.forgetting.get(k, float('nan')))}</td>"
                    for k in TASK_METRICS
                )
                out.append(
                    f'<tr><td class="l">{_esc(s.method + seed)}</td><td class="l">{_esc(s.training)}</td>{cells}</tr>'
                )
            out.append("</table>")
            for k in ("image_auroc", "pixel_auroc"):
                if any(k in s.matrix.values for s in group):
                    salt = f"heat-{row}-{label}-{k}"
                    out.append(f'<p class="note">{_esc(METRICS.get(k, k))} matrix</p>')
                    out.append(f'<div class="curves">{_heatmap_svg(group, k, salt)}</div>')
    if comparisons:
        out.append(
            "<h3>Multi-class: one model for every product, beside one model per product</h3>"
            '<p class="note">Unified: the method trained once on the union of the categories\' good images and tested '
            "on each category. Per class: the same method and parameters trained on each category alone (the vanilla "
            "cells of this grid; – when the grid has none). mAD: ADer's mean of seven metrics (I-AUROC, I-AP, "
            "I-F1max, P-AUROC, P-AP, P-F1max, AUPRO), each averaged over the categories.</p>"
        )
        shown = [k for k in TASK_METRICS if any(k in c.unified for c in comparisons)]
        for c in comparisons:
            out.append(f"<h4>{_esc(c.row)} · {_esc(c.method)}</h4>")
            head = "".join(
                f"<th>{_esc(METRICS.get(k, k))} per class</th><th>{_esc(METRICS.get(k, k))} unified</th>" for k in shown
            )
            out.append(f'<table class="unified"><tr><th class="l">category</th>{head}</tr>')
            for cat in c.categories:
                cells = "".join(
                    f"<td>{fmt_metric(c.per_class.get(k, {}).get(cat, float('nan')))}</td>"
                    f"<td>{fmt_metric(c.unified.get(k, {}).get(cat, float('nan')))}</td>"
                    for k in shown
                )
                out.append(f'<tr><td class="l">{_esc(cat)}</td>{cells}</tr>')
            cells = "".join(
                f"<td>{fmt_metric(c.per_class_mean.get(k, float('nan')))}</td><td>{fmt_metric(c.unified_mean.get(k, float('nan')))}</td>"
                for k in shown
            )
            out.append(f'<tr class="mean"><td class="l">mean</td>{cells}</tr>')
            out.append(
                f'<tr class="mean"><td class="l">mAD</td><td colspan="{len(shown)}">per class {fmt_metric(c.per_class_mad)}</td>'
                f'<td colspan="{len(shown)}">unified {fmt_metric(c.unified_mad)}</td></tr></table>'
            )
    out.append("</section>")
    return "\n".join(out)
