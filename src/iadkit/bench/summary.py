"""Turning run rows into comparison tables: per-category rows, a mean row, one column per method.

Shared by the terminal leaderboard and the HTML report, so both always show the same
numbers. Seeds are averaged within a cell group first. A method's mean row averages the
categories where it has a value; when that is fewer than the categories where some method
has one (a failed cell), the mean is marked incomplete, because such a mean is not
comparable with the others.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Display order and short names; threshold values are not comparable across methods, so
# they are not tabulated.
METRICS: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "aupro": "AUPRO@0.3",
    "aupro_100": "AUPRO@0.3 (100 thr.)",
    # MVTec LOCO test sets (iadkit.evaluation.loco_metrics): the survey's three columns and
    # the headline AUC-sPRO (mean over the two kinds)
    "image_auroc_structural": "I-AUROC structural",
    "image_auroc_logical": "I-AUROC logical",
    "image_auroc_loco_mean": "I-AUROC LOCO mean",
    "auc_spro_0.05": "AUC-sPRO@0.05",
}

# What the calibrated threshold does on the test set (the runs' `operating_point`); lower is
# better, unlike the metrics above.
OPERATING: dict[str, str] = {
    "test_false_alarm_rate": "false alarms @ threshold",
    "test_miss_rate": "misses @ threshold",
}

TIMINGS: dict[str, tuple[str, str]] = {
    "fit_seconds": ("fit time", "s"),
    "seconds_per_image": ("time / image", "ms"),
    "model_seconds_per_image": ("model time / image", "ms"),
    "fit_peak_rss_mb": ("peak RSS (fit)", "MiB"),
    "peak_rss_mb": ("peak RSS (test)", "MiB"),
    "cell_seconds": ("whole cell", "s"),
    "cell_cpu_seconds": ("whole cell, CPU", "s"),
    "fit_peak_cuda_mb": ("peak CUDA (fit)", "MiB"),
    "peak_cuda_mb": ("peak CUDA (test)", "MiB"),
}


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass
class MetricTable:
    metric: str
    setting: str
    methods: list[str]
    rows: list[tuple[str, dict[str, float]]]  # (row label "dataset/category", method -> value)
    mean: dict[str, float] = field(default_factory=dict)
    incomplete: set[str] = field(default_factory=set)  # methods whose mean misses a category

    @property
    def title(self) -> str:
        return METRICS.get(self.metric, OPERATING.get(self.metric, self.metric))

    @property
    def lower_is_better(self) -> bool:
        return self.metric in OPERATING

    def best(self, values: dict[str, float]) -> str | None:
        vals = {m: v for m, v in values.items() if not is_nan(v)}
        if not vals:
            return None
        return (min if self.lower_is_better else max)(vals, key=vals.__getitem__)


def short_dataset(run: dict[str, Any]) -> str:
    """'synthetic' for 'synthetic:./demo-out/synth'; a trailing '*' marks a subsample."""
    name = run["dataset"].partition(":")[0] if ":" in run["dataset"] else run["dataset"]
    return name + ("*" if run.get("subsample") else "")


def row_label(run: dict[str, Any]) -> str:
    return f"{short_dataset(run)} / {run['category']}"


def setting_label(run: dict[str, Any]) -> str:
    params = run.get("setting_params") or {}
    if not params:
        return run["setting"]
    return run["setting"] + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def method_label(run: dict[str, Any], all_runs: list[dict[str, Any]]) -> str:
    """The method name, plus its parameters when one method appears with several."""
    variants = {(r["method"], _params_key(r)) for r in all_runs if r["method"] == run["method"]}
    if len(variants) <= 1:
        return run["method"]
    params = run.get("params") or {}
    size = run.get("image_size")
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{run['method']}[{extra}{',' if extra else ''}{size[0] if size else ''}px]"


def _params_key(r: dict[str, Any]) -> str:
    import json

    return json.dumps([r.get("params"), r.get("image_size")], sort_keys=True)


def metric_tables(runs: list[dict[str, Any]], metrics: Iterable[str] | None = None) -> list[MetricTable]:
    """One table per (setting, metric) present in the finished runs."""
    done = [r for r in runs if r["status"] == "done"]
    wanted = list(metrics) if metrics is not None else list(METRICS)
    tables = []
    order = {setting_label(r): setting_sort_key(r) for r in done}
    for setting in sorted(order, key=order.__getitem__):
        in_setting = [r for r in done if setting_label(r) == setting]
        methods = list(dict.fromkeys(method_label(r, runs) for r in in_setting))
        row_order = list(dict.fromkeys(row_label(r) for r in in_setting))
        for metric in wanted:
            cell: dict[tuple[str, str], list[float]] = defaultdict(list)
            for r in in_setting:
                v = r["metrics"].get(metric)
                if not is_nan(v):
                    cell[(row_label(r), method_label(r, runs))].append(float(v))
            if not cell:
                continue
            rows = []
            for label in row_order:
                values = {m: _mean(cell[(label, m)]) if (label, m) in cell else float("nan") for m in methods}
                if any(not is_nan(v) for v in values.values()):
                    rows.append((label, values))
            table = MetricTable(metric=metric, setting=setting, methods=methods, rows=rows)
            for m in methods:
                col = [vals[m] for _, vals in rows]
                table.mean[m] = _mean(col)
                if any(is_nan(v) for v in col):
                    table.incomplete.add(m)
            tables.append(table)
    return tables


def operating_tables(runs: list[dict[str, Any]]) -> list[MetricTable]:
    """Per (setting, category, method): the test false-alarm and miss rates at the threshold
    each model calibrated on its own held-out good images (target FPR 1 %) — what a line
    would see. Cells without a threshold (too few training images to hold any out) are blank."""
    derived = [
        {**r, "metrics": {k: r["operating_point"].get(k) for k in OPERATING}}
        for r in runs
        if r["status"] == "done" and r.get("operating_point")
    ]
    return metric_tables(derived, OPERATING)


@dataclass
class MethodCost:
    method: str
    n_cells: int
    values: dict[str, float]  # timing key -> mean over cells


def cost_table(runs: list[dict[str, Any]]) -> list[MethodCost]:
    """Mean fit time, time per image and peak memory per method over its finished cells."""
    done = [r for r in runs if r["status"] == "done"]
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        by_method[method_label(r, runs)].append(r)
    out = []
    for m, rs in by_method.items():
        keys = [k for k in TIMINGS if any(k in r["timings"] for r in rs)]
        out.append(MethodCost(m, len(rs), {k: _mean(r["timings"].get(k, float("nan")) for r in rs) for k in keys}))
    return out


def fmt_metric(v: float) -> str:
    return "–" if is_nan(v) else f"{v:.3f}"


def fmt_timing(key: str, v: float) -> str:
    if is_nan(v):
        return "–"
    unit = TIMINGS.get(key, ("", ""))[1]
    if unit == "ms":
        return f"{v * 1000:.1f} ms"
    if unit == "s":
        return f"{v:.1f} s"
    if unit == "MiB":
        return f"{v:.0f} MiB"
    return f"{v:.3g}"


def leaderboard(
    runs: list[dict[str, Any]], metrics: Iterable[str] = ("image_auroc", "pixel_auroc", "aupro")
) -> list[Any]:
    """rich Tables for the terminal, one per metric: a row per method (best mean first), a
    column per category and a mean column; the best value of each column in bold green.

    Methods are the rows here (the HTML report has categories as rows) because category
    names are short and method names long: ten methods still fit an 80-column terminal.

    A grid with several settings first gets each setting's mean (`settings_leaderboard`), then
    the per-category tables of the reference setting (vanilla) only; the HTML report has the
    others.
    """
    from rich import box
    from rich.table import Table

    metrics = list(metrics)
    tables = metric_tables(runs, metrics)
    out: list[Any] = []
    settings = list(dict.fromkeys(t.setting for t in tables))
    if len(settings) > 1:
        out += settings_leaderboard(runs, metrics)
        shown = REFERENCE_SETTING if REFERENCE_SETTING in settings else settings[0]
        tables = [t for t in tables if t.setting == shown]
    for t in tables:
        labels = [label for label, _ in t.rows]
        cats = [label.split(" / ", 1)[1] for label in labels]
        heads = cats if len(set(cats)) == len(cats) else [lbl.replace(" / ", "/") for lbl in labels]
        table = Table(
            title=f"{t.title} · {t.setting}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
        )
        table.add_column("method", no_wrap=True, overflow="ellipsis", min_width=9)
        # The mean comes first: on a narrow terminal the last columns are the ones cut.
        table.add_column("mean", justify="right", style="bold", no_wrap=True, min_width=6)
        for h in heads:  # a number never shrinks; a long category name is cut instead
            table.add_column(h, justify="right", no_wrap=True, min_width=5, overflow="crop")
        column_best = {label: t.best(values) for label, values in t.rows}
        best_mean = t.best(t.mean)
        order = sorted(t.methods, key=lambda m: (is_nan(t.mean[m]), -(0.0 if is_nan(t.mean[m]) else t.mean[m])))
        for m in order:
            cells = [_cell(values[m], column_best[label] == m) for label, values in t.rows]
            mean = _cell(t.mean[m], m == best_mean) + ("†" if m in t.incomplete else "")
            table.add_row(m, mean, *cells)
        datasets = list(dict.fromkeys(label.split(" / ", 1)[0] for label in labels))
        notes = [
            "columns: "
            + "; ".join(
                f"{d}: {', '.join(c for lbl, c in zip(labels, cats) if lbl.startswith(d + ' / '))}" for d in datasets
            )
        ]
        if any(d.endswith("*") for d in datasets):
            notes.append("* subsampled (quick run), not the full protocol")
        if t.incomplete:
            notes.append("† mean over fewer categories (a cell failed or the metric does not apply): not comparable")
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
        out.append(table)
    return out


def _cell(v: float, best: bool) -> str:
    s = fmt_metric(v)
    return f"[bold green]{s}[/bold green]" if best and not is_nan(v) else s


# -- settings: the survey's curves -------------------------------------------------------------
# The settings drawn as curves, with the parameter on the x axis. The survey's tables
# (IM-IAD: few-shot at 1/2/4/8 shots, noise ratio 0-0.20, 1-10 labelled anomalies) are
# these curves read at their points; the vanilla value of each method is the reference.
CURVE_AXES: dict[str, tuple[str, str]] = {
    "few_shot": ("k", "normal shots per category (k)"),
    "noisy": ("ratio", "noise ratio (injected / clean training images)"),
    "semi_supervised": ("k", "labelled anomalies per category (k)"),
}
REFERENCE_SETTING = "vanilla"


def setting_sort_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """A run's setting in reading order: vanilla first, then by setting name, then by its
    non-numeric parameters (few_shot before few_shot with augment=True), then by its numbers
    as numbers (few_shot(k=2) before few_shot(k=10))."""
    words: list[tuple[str, str]] = []
    numbers: list[tuple[str, float]] = []
    for k, v in sorted((run.get("setting_params") or {}).items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers.append((k, float(v)))
        else:  # a flag, a string, a list
            words.append((k, json.dumps(v, sort_keys=True)))
    return (run["setting"] != REFERENCE_SETTING, run["setting"], tuple(words), tuple(numbers))


@dataclass
class SettingCurve:
    """One setting's metric against its parameter, per series (a method, plus the setting's
    other parameters when they vary) and per row (dataset / category), seeds averaged."""

    setting: str
    axis: str  # the parameter on the x axis
    axis_label: str
    metric: str
    xs: list[float]
    rows: list[str]
    series: list[str]
    method_of: dict[str, str]  # series -> method label (for the reference)
    values: dict[tuple[str, str], dict[float, float]]  # (series, row) -> x -> value
    reference: dict[tuple[str, str], float]  # (method, row) -> the vanilla value
    mean: dict[str, dict[float, float]] = field(default_factory=dict)  # series -> x -> mean over rows
    mean_reference: dict[str, float] = field(default_factory=dict)  # method -> vanilla mean over the same rows
    incomplete: dict[str, set[float]] = field(default_factory=dict)  # series -> xs whose mean misses a row

    @property
    def title(self) -> str:
        return METRICS.get(self.metric, self.metric)


def _param_json(run: dict[str, Any], key: str, defaults: dict[str, Any]) -> str:
    """The run's value of setting parameter `key` (its default when unset), as comparable JSON."""
    return json.dumps(run["setting_params"].get(key, defaults.get(key)), sort_keys=True)


def _series_label(run: dict[str, Any], runs: list[dict[str, Any]], defaults: dict[str, Any], varying: list[str]) -> str:
    """A line per method and per value of the setting's other varying parameters; the default
    value goes unnamed (few_shot vs few_shot [augment=true])."""
    extra = ",".join(
        f"{k}={run['setting_params'].get(k, defaults.get(k))}"  # as setting_label writes it
        for k in varying
        if k not in defaults or _param_json(run, k, defaults) != json.dumps(defaults[k], sort_keys=True)
    )
    return method_label(run, runs) + (f" [{extra}]" if extra else "")


def setting_curves(runs: list[dict[str, Any]], metrics: Iterable[str] = ("image_auroc",)) -> list[SettingCurve]:
    """The curves of every setting in `CURVE_AXES` present among the finished runs."""
    done = [r for r in runs if r["status"] == "done"]
    out = []
    for setting, (axis, axis_label) in CURVE_AXES.items():
        in_setting = [r for r in done if r["setting"] == setting and axis in (r.get("setting_params") or {})]
        if not in_setting:
            continue
        defaults = _setting_defaults(setting)
        others = {k for r in in_setting for k in r["setting_params"] if k != axis}
        varying = sorted(k for k in others if len({_param_json(r, k, defaults) for r in in_setting}) > 1)
        # (run, its series label): a line per method and per value of the other varying parameters
        labelled = [(r, _series_label(r, runs, defaults, varying)) for r in in_setting]
        for metric in metrics:
            acc: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            method_of: dict[str, str] = {}
            for r, s in labelled:
                v = r["metrics"].get(metric)
                if is_nan(v):
                    continue
                method_of[s] = method_label(r, runs)
                acc[(s, row_label(r))][float(r["setting_params"][axis])].append(float(v))
            if not acc:
                continue
            ref_acc: dict[tuple[str, str], list[float]] = defaultdict(list)
            for r in done:
                v = r["metrics"].get(metric)
                if r["setting"] == REFERENCE_SETTING and not is_nan(v):
                    ref_acc[(method_label(r, runs), row_label(r))].append(float(v))
            rows = list(dict.fromkeys(row_label(r) for r in in_setting))
            series = list(dict.fromkeys(s for r, s in labelled if (s, row_label(r)) in acc))
            curve = SettingCurve(
                setting=setting,
                axis=axis,
                axis_label=axis_label,
                metric=metric,
                xs=sorted({x for per_x in acc.values() for x in per_x}),
                rows=[row for row in rows if any((s, row) in acc for s in series)],
                series=series,
                method_of=method_of,
                values={key: {x: _mean(vs) for x, vs in per_x.items()} for key, per_x in acc.items()},
                reference={key: _mean(vs) for key, vs in ref_acc.items()},
            )
            for s in series:
                row_set = [row for row in curve.rows if (s, row) in curve.values]
                curve.mean[s] = {}
                for x in curve.xs:
                    vals = [curve.values[(s, row)].get(x, float("nan")) for row in row_set]
                    curve.mean[s][x] = _mean(vals)
                    if len(row_set) < len(curve.rows) or any(is_nan(v) for v in vals):
                        curve.incomplete.setdefault(s, set()).add(x)
                m = method_of[s]
                refs = [curve.reference.get((m, row), float("nan")) for row in row_set]
                if m not in curve.mean_reference and not all(is_nan(v) for v in refs):
                    curve.mean_reference[m] = _mean(refs)
            out.append(curve)
    return out


def _setting_defaults(name: str) -> dict[str, Any]:
    """The default values of a registered setting's parameters ({} for an unknown one, e.g.
    a plugin setting not imported by the reader of the results)."""
    import inspect

    from iadkit.settings import available_settings, get_setting

    if name not in available_settings():
        return {}
    return {
        p.name: p.default
        for p in inspect.signature(get_setting(name)).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


@dataclass
class SettingsOverview:
    """Mean of one metric over categories for every (setting, method): a row per setting."""

    metric: str
    settings: list[str]
    methods: list[str]
    values: dict[str, dict[str, float]]  # setting label -> method -> mean
    incomplete: set[tuple[str, str]] = field(default_factory=set)

    @property
    def title(self) -> str:
        return METRICS.get(self.metric, self.metric)


def settings_overview(runs: list[dict[str, Any]], metric: str = "image_auroc") -> SettingsOverview | None:
    """Each setting's mean per method (the leaderboard's summary when a grid has several)."""
    tables = metric_tables(runs, [metric])  # already in setting order
    if not tables:
        return None
    methods = list(dict.fromkeys(m for t in tables for m in t.methods))
    ov = SettingsOverview(metric=metric, settings=[t.setting for t in tables], methods=methods, values={})
    for t in tables:
        ov.values[t.setting] = {m: t.mean.get(m, float("nan")) for m in methods}
        ov.incomplete |= {(t.setting, m) for m in t.incomplete}
    return ov


def settings_leaderboard(
    runs: list[dict[str, Any]], metrics: Iterable[str] = ("image_auroc", "pixel_auroc")
) -> list[Any]:
    """rich Tables: a row per setting, a column per method, each cell the mean over
    categories; the best method of each row in bold green."""
    from rich import box
    from rich.table import Table

    out = []
    for metric in metrics:
        ov = settings_overview(runs, metric)
        if ov is None:
            continue
        table = Table(
            title=f"{ov.title} · mean over categories, by setting",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
        )
        table.add_column("setting", no_wrap=True)
        for m in ov.methods:
            table.add_column(m, justify="right", no_wrap=True, min_width=6, overflow="ellipsis")
        for s in ov.settings:
            vals = ov.values[s]
            finite = {m: v for m, v in vals.items() if not is_nan(v)}
            best = max(finite, key=finite.__getitem__) if len(finite) > 1 else None
            table.add_row(
                s, *[_cell(vals[m], m == best) + ("†" if (s, m) in ov.incomplete else "") for m in ov.methods]
            )
        if ov.incomplete:
            table.caption = "† mean over fewer categories than the others: not comparable"
            table.caption_justify = "left"
        out.append(table)
    return out


# -- tasks settings: continual (accuracy matrix, forgetting) and multi-class (unified vs per class)
TASK_METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class TaskCellSummary:
    """One finished tasks cell (continual or multi_class), read back from the database.

    `matrix` holds every metric as [steps, tasks] (NaN where untested); `final` the last row
    per task; `final_mean` its mean over tasks; `forgetting` the forgetting measure of each
    metric (continual with >= 2 steps and a square matrix, computed by
    `iadkit.metrics.continual.forgetting_measure` from the stored matrix; NaN when a
    needed entry is undefined)."""

    cell_id: str
    setting: str  # the registered name: continual | multi_class
    setting_label: str
    row: str  # dataset label
    method: str
    seed: int
    training: str
    tasks: list[str]
    matrix: Any  # bench.db.TaskMatrix
    final: dict[str, dict[str, float]]  # metric -> task -> value
    final_mean: dict[str, float]
    forgetting: dict[str, float]
    mad: float


def task_summaries(db: Any, runs: list[dict[str, Any]]) -> list[TaskCellSummary]:
    """Every finished tasks cell with its matrix, final metrics, forgetting and mAD."""
    from iadkit.errors import MetricUndefinedError
    from iadkit.metrics.continual import forgetting_measure
    from iadkit.metrics.unified import mad

    out = []
    for r in runs:
        if r["status"] != "done":
            continue
        m = db.task_matrix(r["cell_id"])
        if m is None:
            continue
        last = m.n_steps - 1
        final = {k: {t: float(v[last, j]) for j, t in enumerate(m.tasks)} for k, v in m.values.items()}
        final_mean = {k: _mean(per.values()) for k, per in final.items()}
        forgetting: dict[str, float] = {}
        if m.n_steps >= 2 and m.n_steps == len(m.tasks):
            for k, v in m.values.items():
                try:
                    forgetting[k] = forgetting_measure(v)
                except MetricUndefinedError:
                    forgetting[k] = float("nan")
        try:
            mad_value = mad(final_mean)
        except MetricUndefinedError:
            mad_value = float("nan")
        out.append(
            TaskCellSummary(
                cell_id=r["cell_id"],
                setting=r["setting"],
                setting_label=setting_label(r),
                row=short_dataset(r),
                method=method_label(r, runs),
                seed=int(r["seed"]),
                training=(r.get("setting_info") or {}).get("training", ""),
                tasks=list(m.tasks),
                matrix=m,
                final=final,
                final_mean=final_mean,
                forgetting=forgetting,
                mad=mad_value,
            )
        )
    return out


@dataclass
class UnifiedComparison:
    """A method trained once on the union of a dataset's categories (multi_class) beside the
    same method (same parameters and size) trained per category (vanilla cells), per category
    and as means, with ADer's mAD of each. Seeds averaged."""

    row: str  # dataset label
    method: str
    categories: list[str]
    unified: dict[str, dict[str, float]]  # metric -> category -> value
    per_class: dict[str, dict[str, float]]  # metric -> category -> value (NaN: no vanilla cell)
    unified_mean: dict[str, float]
    per_class_mean: dict[str, float]
    unified_mad: float
    per_class_mad: float


def unified_comparisons(db: Any, runs: list[dict[str, Any]]) -> list[UnifiedComparison]:
    from iadkit.errors import MetricUndefinedError
    from iadkit.metrics.unified import mad

    done = [r for r in runs if r["status"] == "done"]

    def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(a.get(k) == b.get(k) for k in ("method", "params", "dataset", "subsample", "image_size"))

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        if r["setting"] == "multi_class":
            groups[(short_dataset(r) + "|" + _params_key(r) + "|" + r["dataset"], r["method"])].append(r)
    out = []
    for rs in groups.values():
        first = rs[0]
        matrices = [db.task_matrix(r["cell_id"]) for r in rs]
        matrices = [m for m in matrices if m is not None]
        if not matrices:
            continue
        categories = list(matrices[0].tasks)
        unified: dict[str, dict[str, float]] = {}
        for k in matrices[0].values:
            unified[k] = {c: _mean(float(m.metric(k)[0, j]) for m in matrices) for j, c in enumerate(categories)}
        vanilla = [
            r
            for r in done
            if r["setting"] == REFERENCE_SETTING and same_model(r, first) and r["category"] in categories
        ]
        per_class: dict[str, dict[str, float]] = {}
        for k in unified:
            per_class[k] = {
                c: _mean(r["metrics"].get(k, float("nan")) for r in vanilla if r["category"] == c) for c in categories
            }
        unified_mean = {k: _mean(v.values()) for k, v in unified.items()}
        per_class_mean = {
            k: _mean(v.values()) if all(not is_nan(x) for x in v.values()) else float("nan")
            for k, v in per_class.items()
        }

        def mad_or_nan(values: dict[str, float]) -> float:
            try:
                return mad(values)
            except MetricUndefinedError:
                return float("nan")

        out.append(
            UnifiedComparison(
                row=short_dataset(first),
                method=method_label(first, runs),
                categories=categories,
                unified=unified,
                per_class=per_class,
                unified_mean=unified_mean,
                per_class_mean=per_class_mean,
                unified_mad=mad_or_nan(unified_mean),
                per_class_mad=mad_or_nan(per_class_mean),
            )
        )
    return out
