"""Gathers a sweep's ``results.json`` files into one table, CSV, markdown and the paper's plots.

Every pipeline run (``python -m bert_mini.main --config=configs/pd_*.py``) writes one
``results.json``; a sweep over sizes x methods leaves dozens of them under one root. The paper's
findings are read off two pictures: the dev metric against student size with one line per method
(Turc et al. 2019, Figure 3) and an L x H grid for one method. Plots use matplotlib's Agg canvas
directly, so no display and no global pyplot state are needed.
"""

import csv
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bert_mini.config_lib import HIDDEN_CHOICES, LAYER_CHOICES, NAMED_VARIANTS

# The paper's methods, in the order its tables list them; others sort after, by name.
METHODS = ("pd", "pdf", "pf", "d", "scratch")
METHOD_NAMES = {
    "pd": "Pre-trained Distillation",
    "pdf": "PD + fine-tuning",
    "pf": "Pre-training + fine-tuning",
    "d": "Distillation (random student)",
    "scratch": "Fine-tuning from scratch",
}
# Keys every results.json must hold; a missing one is an error naming the key and the file.
REQUIRED_KEYS = (
    "task",
    "method",
    "student",
    "student_layers",
    "student_hidden",
    "student_params",
    "main_metric",
    "dev",
)
CSV_FIELDS = (
    "task",
    "method",
    "student",
    "layers",
    "hidden",
    "params",
    "main_metric",
    "dev_metric",
    "teacher_metric",
    "wall_time_s",
    "results_path",
)
RESULTS_NAME = "results.json"
# A sweep's teacher and cached logits live in ROOT/shared; no student run is there.
SKIPPED_DIRS = frozenset({"shared"})
_NICKNAMES = {size: nick for nick, size in NAMED_VARIANTS.items()}

Result = dict[str, Any]


# ----------------------------------------------------------------------------- loading


def find_results(paths_or_root: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Every ``results.json`` under the given folders (recursively) or the given files, sorted."""
    if isinstance(paths_or_root, str | os.PathLike):
        paths_or_root = [paths_or_root]
    found: list[str] = []
    for path in map(os.fspath, paths_or_root):
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            found.extend(_walk_results(path))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def _walk_results(root: str) -> list[str]:
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_DIRS)
        if RESULTS_NAME in files:
            found.append(os.path.join(folder, RESULTS_NAME))
            subfolders[:] = []  # a run's stage folders hold their own training results.json
    return sorted(found)


def load_results(paths_or_root: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Result]:
    """Loads and checks every run's results; each dict gains ``results_path`` (its file)."""
    paths = find_results(paths_or_root)
    if not paths:
        raise ValueError(f"no {RESULTS_NAME} found under {paths_or_root}")
    return [load_result_file(path) for path in paths]


def load_result_file(path: str | os.PathLike) -> Result:
    """One results.json, checked so that a bad file fails here, naming itself, not in a plot."""
    path = os.fspath(path)
    try:
        with open(path) as file:
            result = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(result).__name__}")
    for key in REQUIRED_KEYS:
        if key not in result:
            raise ValueError(f"{path}: missing key {key!r}")
    for key in ("task", "method", "student", "main_metric"):
        if not isinstance(result[key], str) or not result[key]:
            raise ValueError(f"{path}: key {key!r} must be a non-empty string")
    for key in ("student_layers", "student_hidden", "student_params"):
        if not _is_number(result[key]):
            raise ValueError(f"{path}: key {key!r} must be a number, got {result[key]!r}")
    metric = result["main_metric"]
    if not isinstance(result["dev"], dict) or metric not in result["dev"]:
        raise ValueError(f"{path}: missing key 'dev.{metric}' (the main metric)")
    if not _is_number(result["dev"][metric]):
        raise ValueError(f"{path}: key 'dev.{metric}' must be a number")
    return {**result, "results_path": path}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- table


def method_order(methods: Iterable[str]) -> list[str]:
    """The paper's methods first, in its order, then any others by name."""
    rank = {method: index for index, method in enumerate(METHODS)}
    return sorted(set(methods), key=lambda method: (rank.get(method, len(rank)), method))


def dev_metric(result: Result) -> float:
    return float(result["dev"][result["main_metric"]])


def teacher_metric(result: Result) -> float | None:
    """The teacher's dev main metric, or None for methods without a teacher (pf, scratch)."""
    teacher = result.get("teacher")
    if not isinstance(teacher, dict) or not isinstance(teacher.get("dev"), dict):
        return None
    value = teacher["dev"].get(result["main_metric"])
    return float(value) if _is_number(value) else None


def _run_key(result: Result) -> tuple[str, str, str]:
    return result["task"], result["method"], result["student"]


def _sort_key(result: Result) -> tuple:
    rank = {method: index for index, method in enumerate(METHODS)}
    method = result["method"]
    size = (result["student_layers"], result["student_hidden"])
    return result["task"], size, rank.get(method, len(rank)), method


def check_unique(results: Sequence[Result]) -> None:
    """Two files for one (task, method, student) would silently shadow each other in a table."""
    seen: dict[tuple[str, str, str], str] = {}
    for result in results:
        key = _run_key(result)
        path = result.get("results_path", "?")
        if key in seen:
            raise ValueError(
                f"two results for task={key[0]} method={key[1]} student={key[2]}: "
                f"{seen[key]} and {path}"
            )
        seen[key] = path


def results_table(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One flat row per run (the CSV's rows), sorted by task, size and method."""
    check_unique(results)
    return [
        {
            "task": result["task"],
            "method": result["method"],
            "student": result["student"],
            "layers": int(result["student_layers"]),
            "hidden": int(result["student_hidden"]),
            "params": int(result["student_params"]),
            "main_metric": result["main_metric"],
            "dev_metric": dev_metric(result),
            "teacher_metric": teacher_metric(result),
            "wall_time_s": result.get("wall_time_s"),
            "results_path": result.get("results_path", ""),
        }
        for result in sorted(results, key=_sort_key)
    ]


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> pathlib.Path:
    """Writes the table's rows; None becomes an empty cell."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_FIELDS})
    return path


def _percent(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{100 * value:.1f}"


def _params_text(params: int) -> str:
    return f"{params / 1e6:.1f}M"


def size_label(student: str) -> str:
    """``L-4_H-256 (mini)``: the paper's nicknames help read the rows."""
    nickname = _NICKNAMES.get(student)
    return f"{student} ({nickname})" if nickname else student


def markdown_table(results: Sequence[Result]) -> str:
    """Per task: sizes as rows, methods as columns, dev main metric in %, then the teacher."""
    rows = results_table(results)
    blocks = [_markdown_task(task, rows) for task in sorted({row["task"] for row in rows})]
    return "\n\n".join(blocks) + "\n"


def _markdown_task(task: str, all_rows: Sequence[dict[str, Any]]) -> str:
    rows = [row for row in all_rows if row["task"] == task]
    metric = rows[0]["main_metric"]
    methods = method_order(row["method"] for row in rows)
    sizes = sorted({(row["layers"], row["hidden"], row["student"]) for row in rows})
    cells = {(row["student"], row["method"]): row["dev_metric"] for row in rows}
    params = {row["student"]: row["params"] for row in rows}
    lines = [
        f"### {task}: dev {metric} (%)",
        "",
        "| size | params | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for _, _, student in sizes:
        values = [_percent(cells.get((student, method))) for method in methods]
        lines.append(
            f"| {size_label(student)} | {_params_text(params[student])} | "
            + " | ".join(values)
            + " |"
        )
    teachers = sorted({row["teacher_metric"] for row in rows if row["teacher_metric"] is not None})
    if teachers:
        shown = ", ".join(_percent(value) for value in teachers)
        lines += ["", f"Teacher: {shown} (dev {metric}, %)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _single_task(results: Sequence[Result]) -> str:
    tasks = sorted({result["task"] for result in results})
    if len(tasks) != 1:
        raise ValueError(f"a plot shows one task; the results hold {tasks or 'none'}")
    return tasks[0]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg, no display needed
    return figure


def _save(figure, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def plot_metric_vs_size(results: Sequence[Result], path: str | os.PathLike) -> pathlib.Path:
    """Dev metric against student parameters (log x), one line per method, teacher dashed."""
    task = _single_task(results)
    check_unique(results)
    metric = results[0]["main_metric"]
    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    for method in method_order(result["method"] for result in results):
        points = sorted(
            (int(result["student_params"]), 100 * dev_metric(result))
            for result in results
            if result["method"] == method
        )
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=METHOD_NAMES.get(method, method))
    teachers = sorted({value for value in map(teacher_metric, results) if value is not None})
    for value in teachers:
        axes.axhline(
            100 * value, linestyle="--", color="gray", label=f"teacher ({100 * value:.1f})"
        )
    axes.set_xscale("log")
    axes.set_xlabel("student parameters")
    axes.set_ylabel(f"dev {metric} (%)")
    axes.set_title(f"{task}: dev {metric} against student size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def heatmap_grid(results: Sequence[Result], method: str) -> tuple[list[int], list[int], np.ndarray]:
    """(layers, hiddens, grid[L, H]) of one method's dev metric; NaN where a size was not run.

    The axes always span the paper's 6 x 4 sizes (plus any other size that was run), so missing
    runs show as blanks instead of shrinking the picture.
    """
    _single_task(results)
    check_unique(results)
    chosen = [result for result in results if result["method"] == method]
    if not chosen:
        raise ValueError(f"no results for method {method!r}")
    layers = sorted(set(LAYER_CHOICES) | {int(result["student_layers"]) for result in chosen})
    hiddens = sorted(set(HIDDEN_CHOICES) | {int(result["student_hidden"]) for result in chosen})
    grid = np.full((len(layers), len(hiddens)), np.nan)
    for result in chosen:
        row = layers.index(int(result["student_layers"]))
        column = hiddens.index(int(result["student_hidden"]))
        grid[row, column] = dev_metric(result)
    return layers, hiddens, grid


def plot_heatmap(results: Sequence[Result], method: str, path: str | os.PathLike) -> pathlib.Path:
    """L x H grid of one method's dev metric (%), values written in, blanks for sizes not run."""
    layers, hiddens, grid = heatmap_grid(results, method)
    task = _single_task(results)
    metric = results[0]["main_metric"]
    percent = np.ma.masked_invalid(100 * grid)
    figure = _new_figure(5.5, 5.0)
    axes = figure.add_subplot()
    import matplotlib as mpl

    colormap = mpl.colormaps["viridis"].with_extremes(bad="0.92")  # light gray: not run
    image = axes.imshow(percent, cmap=colormap, origin="lower", aspect="auto")
    figure.colorbar(image, ax=axes, label=f"dev {metric} (%)")
    low, high = image.get_clim()
    for row, column in zip(*np.nonzero(~np.isnan(grid)), strict=True):
        value = percent[row, column]
        dark = (value - low) / max(high - low, 1e-9) < 0.5  # viridis is dark at its low end
        axes.text(
            column,
            row,
            f"{value:.1f}",
            ha="center",
            va="center",
            color="white" if dark else "black",
            fontsize="small",
        )
    axes.set_xticks(range(len(hiddens)), [str(hidden) for hidden in hiddens])
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("hidden size H")
    axes.set_ylabel("layers L")
    axes.set_title(f"{task}: {METHOD_NAMES.get(method, method)}")
    return _save(figure, path)


# ----------------------------------------------------------------------------- all at once


def write_report(results: Sequence[Result], out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """sweep.csv, sweep.md, metric_vs_size.png and heatmap_<method>.png in ``out_dir``.

    With several tasks the plots get a ``_<task>`` suffix, since a plot shows one task.
    """
    out_dir = pathlib.Path(out_dir)
    written = [write_csv(results_table(results), out_dir / "sweep.csv")]
    markdown_path = out_dir / "sweep.md"
    markdown_path.write_text(markdown_table(results))
    written.append(markdown_path)
    tasks = sorted({result["task"] for result in results})
    for task in tasks:
        task_results = [result for result in results if result["task"] == task]
        suffix = f"_{task}" if len(tasks) > 1 else ""
        written.append(plot_metric_vs_size(task_results, out_dir / f"metric_vs_size{suffix}.png"))
        for method in method_order(result["method"] for result in task_results):
            path = out_dir / f"heatmap_{method}{suffix}.png"
            written.append(plot_heatmap(task_results, method, path))
    return written
