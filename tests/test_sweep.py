"""Tests of the size x method sweep (``bert_mini.sweep``) and its report (``bert_mini.report``).

The report is built from results.json files written here; the sequential runner runs a fake
``bert_mini.main`` (a tiny script given through ``--python``) that writes results.json, fails, or
exits 0 without results, so no model is trained.
"""

import csv
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from bert_mini import report, sweep
from bert_mini.config_lib import SIZES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK = "sst2"
TEACHER_ACCURACY = 0.912
# (student, method) -> dev accuracy; L-4_H-512 has no "d" run, so that cell must stay blank.
DEV_ACCURACY = {
    ("L-2_H-128", "pd"): 0.8214,
    ("L-2_H-128", "pf"): 0.8006,
    ("L-2_H-128", "d"): 0.7851,
    ("L-4_H-256", "pd"): 0.8549,
    ("L-4_H-256", "pf"): 0.8402,
    ("L-4_H-256", "d"): 0.8123,
    ("L-4_H-512", "pd"): 0.8866,
    ("L-4_H-512", "pf"): 0.8745,
}
TEACHER_METHODS = {"pd", "pdf", "d"}


def _bert_params(layers: int, hidden: int) -> int:
    """BERT with a 2-way classifier: embeddings, layers, pooler, head (a realistic x axis)."""
    embeddings = (30522 + 512 + 2) * hidden + 2 * hidden
    layer = 12 * hidden * hidden + 13 * hidden
    return embeddings + layers * layer + hidden * hidden + hidden + 2 * hidden + 2


def _result(student: str, method: str, accuracy: float, task: str = TASK) -> dict:
    dims = SIZES[student]
    layers, hidden = dims["num_hidden_layers"], dims["hidden_size"]
    teacher = (
        {"checkpoint": "/ckpt/teacher", "dev": {"accuracy": TEACHER_ACCURACY}}
        if method in TEACHER_METHODS
        else None
    )
    return {
        "task": task,
        "method": method,
        "student": student,
        "student_layers": layers,
        "student_hidden": hidden,
        "student_params": _bert_params(layers, hidden),
        "main_metric": "accuracy",
        "dev": {"accuracy": accuracy, "loss": 1.0 - accuracy},
        "teacher": teacher,
        "stages": {"distill": {"status": "done", "wall_time_s": 3.0, "metrics": {}}},
        "wall_time_s": 100.0 * layers + hidden / 128,
        "config": {},
    }


def _write_json(path: pathlib.Path, content) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def sweep_root(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "sweep"
    for (student, method), accuracy in DEV_ACCURACY.items():
        _write_json(root / student / method / "results.json", _result(student, method, accuracy))
    # The shared teacher folder may hold its own results.json; it is no student run.
    _write_json(root / "shared" / "teacher" / "results.json", {"teacher": "not a run"})
    return root


def _assert_png(path: pathlib.Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m bert_mini.sweep: error: ")
    return lines[0]


# ----------------------------------------------------------------------------- report


def test_report_cli_writes_csv_markdown_and_pngs(sweep_root, tmp_path, capsys):
    out = tmp_path / "report"
    assert sweep.main(["report", f"--root={sweep_root}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out

    with (out / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(DEV_ACCURACY)
    assert [(row["student"], row["method"]) for row in rows] == [
        ("L-2_H-128", "pd"),
        ("L-2_H-128", "pf"),
        ("L-2_H-128", "d"),
        ("L-4_H-256", "pd"),
        ("L-4_H-256", "pf"),
        ("L-4_H-256", "d"),
        ("L-4_H-512", "pd"),
        ("L-4_H-512", "pf"),
    ]
    for row in rows:
        expected = _result(
            row["student"], row["method"], DEV_ACCURACY[row["student"], row["method"]]
        )
        assert row["task"] == TASK and row["main_metric"] == "accuracy"
        assert int(row["layers"]) == expected["student_layers"]
        assert int(row["hidden"]) == expected["student_hidden"]
        assert int(row["params"]) == expected["student_params"]
        assert float(row["dev_metric"]) == expected["dev"]["accuracy"]
        assert float(row["wall_time_s"]) == expected["wall_time_s"]
        if row["method"] == "pf":
            assert row["teacher_metric"] == ""  # PF has no teacher
        else:
            assert float(row["teacher_metric"]) == TEACHER_ACCURACY
        assert pathlib.Path(row["results_path"]).parent.parts[-2:] == (
            row["student"],
            row["method"],
        )

    markdown = (out / "sweep.md").read_text()
    assert markdown in printed  # the command prints the table too
    lines = markdown.splitlines()
    assert "| size | params | pd | pf | d |" in lines
    params_small = _bert_params(4, 512) / 1e6
    assert f"| L-4_H-256 (mini) | {_bert_params(4, 256) / 1e6:.1f}M | 85.5 | 84.0 | 81.2 |" in lines
    assert f"| L-4_H-512 (small) | {params_small:.1f}M | 88.7 | 87.5 |  |" in lines  # no d run
    assert "Teacher: 91.2 (dev accuracy, %)" in lines
    size_rows = [line for line in lines if line.startswith("| L-")]
    assert [line.split(" ")[1] for line in size_rows] == ["L-2_H-128", "L-4_H-256", "L-4_H-512"]

    _assert_png(out / "metric_vs_size.png")
    for method in ("pd", "pf", "d"):
        _assert_png(out / f"heatmap_{method}.png")
    assert not (out / "heatmap_pdf.png").exists()  # no pdf run, no pdf picture


def test_heatmap_grid_spans_the_paper_sizes_with_blanks():
    results = [_result(student, method, acc) for (student, method), acc in DEV_ACCURACY.items()]
    layers, hiddens, grid = report.heatmap_grid(results, "pf")
    assert layers == [2, 4, 6, 8, 10, 12] and hiddens == [128, 256, 512, 768]
    assert grid.shape == (6, 4)
    assert grid[0, 0] == DEV_ACCURACY["L-2_H-128", "pf"]
    assert grid[1, 1] == DEV_ACCURACY["L-4_H-256", "pf"]
    assert grid[1, 2] == DEV_ACCURACY["L-4_H-512", "pf"]
    assert np.isnan(grid).sum() == 24 - 3
    _, _, grid_d = report.heatmap_grid(results, "d")
    assert np.isnan(grid_d[1, 2])  # L-4_H-512 was not run with d
    with pytest.raises(ValueError, match="no results for method 'pdf'"):
        report.heatmap_grid(results, "pdf")


def test_markdown_has_one_block_per_task_and_plots_refuse_mixed_tasks():
    results = [
        _result("L-2_H-128", "pd", 0.8),
        _result("L-2_H-128", "pd", 0.75, task="mrpc"),
    ]
    markdown = report.markdown_table(results)
    assert "### mrpc: dev accuracy (%)" in markdown and "### sst2: dev accuracy (%)" in markdown
    assert markdown.index("### mrpc") < markdown.index("### sst2")
    with pytest.raises(ValueError, match=r"one task; the results hold \['mrpc', 'sst2'\]"):
        report.plot_metric_vs_size(results, "/nonexistent/never_written.png")


def test_malformed_results_json_names_the_file(sweep_root):
    bad = _write_json(sweep_root / "L-2_H-256" / "pd" / "results.json", '{"task": "sst2",')
    with pytest.raises(ValueError, match=rf"^{bad}: malformed JSON"):
        report.load_results(sweep_root)


@pytest.mark.parametrize(
    "drop, message",
    [
        ("method", "missing key 'method'"),
        ("student_params", "missing key 'student_params'"),
        ("dev.accuracy", "missing key 'dev.accuracy' (the main metric)"),
    ],
)
def test_missing_key_names_the_key_and_the_file(tmp_path, drop, message):
    result = _result("L-2_H-128", "pd", 0.8)
    if drop == "dev.accuracy":
        del result["dev"]["accuracy"]
    else:
        del result[drop]
    path = _write_json(tmp_path / "run" / "results.json", result)
    with pytest.raises(ValueError) as error:
        report.load_results(tmp_path)
    assert str(error.value) == f"{path}: {message}"


def test_duplicate_runs_and_empty_roots_are_errors(tmp_path, capsys):
    first = _write_json(tmp_path / "a" / "results.json", _result("L-2_H-128", "pd", 0.8))
    second = _write_json(tmp_path / "b" / "results.json", _result("L-2_H-128", "pd", 0.7))
    with pytest.raises(
        ValueError, match=f"two results for task=sst2 method=pd .*{first} and {second}"
    ):
        report.results_table(report.load_results(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sweep.main(["report", f"--root={empty}"]) == 2
    assert f"no results.json found under {empty}" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- commands

RUN_ARGS = [
    "run",
    "--config=configs/pd_glue.py:task=mrpc",
    "--sizes=tiny,L-4_H-256",
    "--methods=pd,scratch",
    "--python=python3",
    "--runlocal",
    "--set",
    "train.learning_rate=3e-5",
    "--set",
    "config.seed=7",
    "--student-init",
    "mini=/ckpt/mini",
]


def _expected_command(root: pathlib.Path, student: str, method: str) -> list[str]:
    command = [
        "python3",
        "-m",
        "bert_mini.main",
        f"--config=configs/pd_glue.py:task=mrpc,student={student},method={method},runlocal",
        f"--workdir={root}/{student}/{method}",
        f"--config.pipeline.shared_dir={root}/shared",
    ]
    if student == "L-4_H-256" and method == "pd":  # scratch starts from random weights
        command.append("--config.pipeline.student_init=/ckpt/mini")
    return command + ["--config.train.learning_rate=3e-5", "--config.seed=7"]


@pytest.mark.parametrize("mode", [["--jobs=print"], ["--dry-run"], ["--jobs=scripts", "--dry-run"]])
def test_print_and_dry_run_give_one_command_per_run(tmp_path, capsys, mode):
    root = tmp_path / "sweep"
    assert sweep.main([*RUN_ARGS, f"--root={root}", *mode]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert commands == [
        _expected_command(root, student, method)
        for student in ("L-2_H-128", "L-4_H-256")
        for method in ("pd", "scratch")
    ]
    if "--jobs=scripts" in mode:
        assert f"# would write {root}/jobs/L-2_H-128__pd.sh" in lines
    assert not root.exists()  # printing and dry runs write nothing


def test_runs_with_results_are_skipped_unless_forced(tmp_path, capsys):
    root = tmp_path / "sweep"
    _write_json(root / "L-2_H-128" / "scratch" / "results.json", {})
    assert sweep.main([*RUN_ARGS, f"--root={root}", "--jobs=print"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert "--workdir=" + str(root / "L-2_H-128" / "scratch") not in captured.out
    assert "skip L-2_H-128 scratch:" in captured.err
    assert sweep.main([*RUN_ARGS, f"--root={root}", "--jobs=print", "--force"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_sizes_all_is_the_papers_24():
    sizes = sweep.parse_sizes("all")
    assert len(sizes) == 24 and len(set(sizes)) == 24
    assert set(sizes) == set(SIZES) - {"L-24_H-1024"}
    assert sweep.parse_sizes("mini, L-4_H-256,tiny") == ["L-4_H-256", "L-2_H-128"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sizes=L-3_H-128"], "--sizes: unknown model variant 'L-3_H-128'"),
        (["--sizes=,"], "--sizes is empty"),
        (["--methods=pd,kd"], "--methods: unknown method 'kd'"),
        (["--set", "learning_rate"], "--set 'learning_rate': expected KEY=VALUE"),
        (["--set", "train..lr=1"], "--set 'train..lr=1': expected KEY=VALUE"),
        (["--student-init", "mini"], "--student-init 'mini': expected SIZE=PATH"),
        (["--student-init", "base=/ckpt"], "size L-12_H-768 is not in --sizes"),
        (["--student-init", "huge=/ckpt"], "--student-init 'huge=/ckpt': unknown model variant"),
        (["--config=configs/pd_sst2.py:student=mini"], "already sets 'student'"),
        (["--jobs=parallel"], "argument --jobs: invalid choice: 'parallel'"),
    ],
)
def test_bad_run_arguments_give_one_line_errors(tmp_path, capsys, extra, message):
    argv = ["run", "--config=configs/pd_sst2.py", "--sizes=tiny", f"--root={tmp_path}", *extra]
    assert sweep.main(argv) == 2
    assert message in _one_line_error(capsys)


def test_no_command_is_a_one_line_error(capsys):
    assert sweep.main([]) == 2
    assert "give a command: run or report" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- running

FAKE_MAIN = r'''
"""Stands in for `python -m bert_mini.main`: d fails, pf writes nothing, others write results."""
import json, os, sys
args = dict(arg.split("=", 1) for arg in sys.argv[1:] if arg.startswith("--"))
config_args = dict(item.split("=") for item in args["--config"].split(":")[1].split(","))
student, method = config_args["student"], config_args["method"]
workdir = args["--workdir"]
root = os.path.dirname(os.path.dirname(workdir))
assert args["--config.pipeline.shared_dir"] == os.path.join(root, "shared")
with open(os.path.join(root, "calls.txt"), "a") as calls:
    calls.write(f"{student} {method}\n")
print(f"fake training {student} {method}")
if method == "d":
    print("boom: the teacher went away", file=sys.stderr)
    sys.exit(3)
if method == "pf":
    sys.exit(0)
layers, hidden = (int(part.split("-")[1]) for part in student.split("_"))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "results.json"), "w") as file:
    json.dump({
        "task": "sst2", "method": method, "student": student, "student_layers": layers,
        "student_hidden": hidden, "student_params": layers * hidden * 1000,
        "main_metric": "accuracy", "dev": {"accuracy": (layers * 1000 + hidden) / 1e5},
        "teacher": {"checkpoint": "/t", "dev": {"accuracy": 0.9}}, "wall_time_s": 1.0,
    }, file)
'''


@pytest.fixture
def fake_python(tmp_path: pathlib.Path) -> str:
    script = tmp_path / "fake_main.py"
    script.write_text(FAKE_MAIN)
    return shlex.join([sys.executable, str(script)])


def _calls(root: pathlib.Path) -> list[str]:
    return (root / "calls.txt").read_text().splitlines()


def test_sequential_runs_continue_past_failures_skip_done_and_report(tmp_path, capsys, fake_python):
    root = tmp_path / "sweep"
    done_before = _result("L-2_H-128", "pd", 0.8)
    _write_json(root / "L-2_H-128" / "pd" / "results.json", done_before)
    argv = [
        "run",
        "--config=configs/pd_sst2.py",
        "--sizes=tiny,mini",
        "--methods=pd,d,pf",
        f"--root={root}",
        f"--python={fake_python}",
    ]
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    # Sizes outermost; the finished tiny/pd run is skipped; d's failure does not stop the rest.
    assert _calls(root) == [
        "L-2_H-128 d",
        "L-2_H-128 pf",
        "L-4_H-256 pd",
        "L-4_H-256 d",
        "L-4_H-256 pf",
    ]
    assert "fake training L-4_H-256 pd" in out  # the run's output is streamed
    assert "sweep: 1 done, 1 skipped, 4 failed" in out
    assert "FAILED L-2_H-128 d: exit status 3" in out
    assert (
        "FAILED L-4_H-256 pf: exited 0 but wrote no " + str(root / "L-4_H-256/pf/results.json")
        in out
    )
    assert "boom: the teacher went away" in (root / "logs" / "L-4_H-256__d.log").read_text()

    with (root / "sweep.csv").open() as file:  # the report covers every finished run
        rows = list(csv.DictReader(file))
    assert [(row["student"], row["method"]) for row in rows] == [
        ("L-2_H-128", "pd"),
        ("L-4_H-256", "pd"),
    ]
    assert float(rows[0]["dev_metric"]) == 0.8 and math.isclose(
        float(rows[1]["dev_metric"]), 0.04256
    )
    assert "| L-4_H-256 (mini) | 1.0M | 4.3 |" in (root / "sweep.md").read_text()
    _assert_png(root / "metric_vs_size.png")
    _assert_png(root / "heatmap_pd.png")

    # Rerunning does only the missing work.
    (root / "calls.txt").unlink()
    assert sweep.main(argv) == 1
    assert _calls(root) == ["L-2_H-128 d", "L-2_H-128 pf", "L-4_H-256 d", "L-4_H-256 pf"]
    assert "sweep: 0 done, 2 skipped, 4 failed" in capsys.readouterr().out


def test_scripts_are_executable_lint_clean_and_run(tmp_path, capsys, fake_python):
    root = tmp_path / "sweep"
    argv = ["run", "--config=configs/pd_sst2.py", "--sizes=tiny,mini", "--methods=pd,pdf"]
    assert sweep.main([*argv, f"--root={root}", f"--python={fake_python}", "--jobs=scripts"]) == 0
    names = ["L-2_H-128__pd", "L-2_H-128__pdf", "L-4_H-256__pd", "L-4_H-256__pdf"]
    scripts = [root / "jobs" / f"{name}.sh" for name in names]
    assert capsys.readouterr().out.splitlines() == [str(script) for script in scripts]
    assert sorted((root / "jobs").iterdir()) == scripts
    for script in scripts:
        assert os.access(script, os.X_OK)
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
    lint = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # A script runs from the folder the sweep was made in, wherever it is started.
    done = subprocess.run([str(scripts[3])], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fake training L-4_H-256 pdf" in done.stdout
    assert json.loads((root / "L-4_H-256" / "pdf" / "results.json").read_text())["method"] == "pdf"
