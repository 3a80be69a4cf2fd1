"""Sweeps Pre-trained Distillation over student sizes x methods, then reports (Turc et al. 2019).

    python -m bert_mini.sweep run --config=configs/pd_sst2.py --sizes=tiny,mini \
        --methods=pd,pf --root=/tmp/sweep --runlocal
    python -m bert_mini.sweep run --config=configs/pd_glue.py:task=mrpc --sizes=all \
        --root=gs://bucket/sweep --jobs=print      # one command per line, for a scheduler
    python -m bert_mini.sweep report --root=/tmp/sweep

Each run is one ``python -m bert_mini.main`` pipeline with workdir ``ROOT/<size>/<method>``; every
run shares ``ROOT/shared`` (``--config.pipeline.shared_dir``), so the teacher is fine-tuned and its
logits cached once per sweep. A run whose ``results.json`` exists is skipped, so rerunning the
same command after a crash or a failed run only does the missing work.
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bert_mini import report
from bert_mini.config_lib import HIDDEN_CHOICES, LAYER_CHOICES, canonical_variant

PROG = "python -m bert_mini.sweep"
MAIN_MODULE = "bert_mini.main"
JOBS = ("sequential", "print", "scripts")
# The paper's 24 compact students, smallest first.
ALL_SIZES = tuple(f"L-{layers}_H-{hidden}" for layers in LAYER_CHOICES for hidden in HIDDEN_CHOICES)
# Methods that start from a pre-trained student; D and scratch start from random weights, so a
# --student-init checkpoint is not passed to them.
PRETRAINED_METHODS = frozenset({"pd", "pdf", "pf"})
_CONFIG_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Arguments the sweep itself appends to --config; the config must not set them already.
_SWEEP_CONFIG_ARGS = ("student", "method", "runlocal")


class SweepError(Exception):
    """Bad sweep input; ``main`` prints it as one line and returns 2."""


@dataclass(frozen=True)
class Run:
    """One pipeline run of the sweep: a student size trained with one method."""

    size: str
    method: str
    workdir: str
    command: tuple[str, ...]

    @property
    def results_path(self) -> str:
        return _join(self.workdir, report.RESULTS_NAME)

    @property
    def name(self) -> str:
        return f"{self.size}__{self.method}"


# ----------------------------------------------------------------------------- parsing


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_sizes(text: str) -> list[str]:
    """``all`` or comma-separated sizes/nicknames -> canonical names, duplicates dropped."""
    if text.strip().lower() == "all":
        return list(ALL_SIZES)
    sizes: list[str] = []
    for item in _split_list(text):
        try:
            size = canonical_variant(item)
        except ValueError as error:
            raise SweepError(f"--sizes: {error}") from None
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise SweepError("--sizes is empty; give sizes like L-2_H-128,mini or 'all'")
    return sizes


def parse_methods(text: str) -> list[str]:
    """``all`` or comma-separated methods from ``report.METHODS``, duplicates dropped."""
    if text.strip().lower() == "all":
        return list(report.METHODS)
    methods: list[str] = []
    for method in _split_list(text.lower()):
        if method not in report.METHODS:
            raise SweepError(f"--methods: unknown method {method!r}; choose from {report.METHODS}")
        if method not in methods:
            methods.append(method)
    if not methods:
        raise SweepError(f"--methods is empty; choose from {report.METHODS} or 'all'")
    return methods


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    """``--set train.learning_rate=3e-5`` -> ``("train.learning_rate", "3e-5")``.

    A leading ``config.`` is accepted too, since that is how main.py spells it.
    """
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not _CONFIG_KEY_RE.match(key):
            raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=3e-5")
        overrides.append((key, value))
    return overrides


def parse_student_inits(items: Sequence[str], sizes: Sequence[str]) -> dict[str, str]:
    """``--student-init mini=/ckpt`` -> ``{"L-4_H-256": "/ckpt"}``; each size must be swept."""
    inits: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SweepError(f"--student-init {item!r}: expected SIZE=PATH, e.g. mini=/ckpt/mini")
        try:
            size = canonical_variant(name)
        except ValueError as error:
            raise SweepError(f"--student-init {item!r}: {error}") from None
        if size not in sizes:
            raise SweepError(f"--student-init {item!r}: size {size} is not in --sizes")
        if size in inits:
            raise SweepError(f"--student-init: size {size} given twice")
        inits[size] = path.strip()
    return inits


def config_with_args(config: str, size: str, method: str, runlocal: bool) -> str:
    """``configs/pd_glue.py:task=mrpc`` -> ``configs/pd_glue.py:task=mrpc,student=S,method=M``."""
    file, _, arg = config.partition(":")
    if not file.strip():
        raise SweepError(f"--config {config!r}: expected FILE.py[:ARGS]")
    given = _split_list(arg)
    for item in given:
        key = item.partition("=")[0].strip()
        if key in _SWEEP_CONFIG_ARGS:
            raise SweepError(
                f"--config {config!r} already sets {key!r}; the sweep sets it "
                "(use --sizes, --methods, --runlocal)"
            )
    args = [*given, f"student={size}", f"method={method}"] + (["runlocal"] if runlocal else [])
    return f"{file}:{','.join(args)}"


# ----------------------------------------------------------------------------- commands


def _join(root: str, *parts: str) -> str:
    """Joins with '/', keeping ``gs://bucket`` roots intact (pathlib would squash the '//')."""
    return "/".join([root.rstrip("/"), *parts])


def build_runs(
    *,
    config: str,
    sizes: Sequence[str],
    methods: Sequence[str],
    root: str,
    runlocal: bool = False,
    overrides: Sequence[tuple[str, str]] = (),
    student_inits: dict[str, str] | None = None,
    python: str = sys.executable,
) -> list[Run]:
    """Every size x method run, sizes outermost so a size's methods share its cached student."""
    student_inits = student_inits or {}
    launcher = shlex.split(python)
    if not launcher:
        raise SweepError("--python is empty")
    runs = []
    for size in sizes:
        for method in methods:
            workdir = _join(root, size, method)
            command = [
                *launcher,
                "-m",
                MAIN_MODULE,
                f"--config={config_with_args(config, size, method, runlocal)}",
                f"--workdir={workdir}",
                f"--config.pipeline.shared_dir={_join(root, 'shared')}",
            ]
            if size in student_inits and method in PRETRAINED_METHODS:
                command.append(f"--config.pipeline.student_init={student_inits[size]}")
            command += [f"--config.{key}={value}" for key, value in overrides]
            runs.append(Run(size, method, workdir, tuple(command)))
    return runs


def command_line(run: Run) -> str:
    """The run as one shell-quoted line (what --jobs=print prints and scripts exec)."""
    return shlex.join(run.command)


def is_done(run: Run) -> bool:
    return os.path.isfile(run.results_path)


def job_script(run: Run, cwd: str) -> str:
    """A bash script that runs one job from ``cwd`` (config paths are relative to it)."""
    return (
        "#!/usr/bin/env bash\n"
        f"# bert_mini sweep: student {run.size}, method {run.method}\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(cwd)}\n"
        f"exec {command_line(run)}\n"
    )


def write_scripts(runs: Sequence[Run], jobs_dir: str | os.PathLike, cwd: str) -> list[pathlib.Path]:
    """One executable ``<size>__<method>.sh`` per run, for a scheduler that submits scripts."""
    jobs_dir = pathlib.Path(jobs_dir)
    jobs_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in runs:
        path = jobs_dir / f"{run.name}.sh"
        path.write_text(job_script(run, cwd))
        path.chmod(0o755)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    run: Run
    returncode: int
    wall_time_s: float
    error: str = ""  # why the run counts as failed; "" when it succeeded


def run_one(run: Run, log_path: str | os.PathLike) -> Outcome:
    """Runs one job, streaming its output to stdout and to ``log_path``."""
    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {command_line(run)}\n")
        try:
            process = subprocess.Popen(
                run.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # stream, not block-buffer
            )
        except OSError as error:
            return Outcome(run, 127, 0.0, f"could not start {run.command[0]!r}: {error}")
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        returncode = process.wait()
    wall_time_s = time.monotonic() - start
    if returncode != 0:
        return Outcome(run, returncode, wall_time_s, f"exit status {returncode}")
    if not is_done(run):
        return Outcome(run, returncode, wall_time_s, f"exited 0 but wrote no {run.results_path}")
    return Outcome(run, returncode, wall_time_s)


def run_sequential(runs: Sequence[Run], logs_dir: str | os.PathLike) -> list[Outcome]:
    """Runs the jobs one after another; a failed run does not stop the ones after it."""
    outcomes = []
    for index, run in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {run.size} {run.method}: {command_line(run)}", flush=True)
        outcome = run_one(run, pathlib.Path(logs_dir) / f"{run.name}.log")
        status = f"FAILED ({outcome.error})" if outcome.error else "done"
        print(
            f"[{index}/{len(runs)}] {run.size} {run.method}: {status} "
            f"in {outcome.wall_time_s:.1f} s",
            flush=True,
        )
        outcomes.append(outcome)
    return outcomes


def summary_lines(outcomes: Sequence[Outcome], skipped: int, logs_dir: str) -> list[str]:
    failed = [outcome for outcome in outcomes if outcome.error]
    lines = [f"sweep: {len(outcomes) - len(failed)} done, {skipped} skipped, {len(failed)} failed"]
    for outcome in failed:
        lines.append(
            f"  FAILED {outcome.run.size} {outcome.run.method}: {outcome.error}; "
            f"log {_join(logs_dir, outcome.run.name + '.log')}"
        )
    return lines


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a ``SweepError`` (one line from ``main``), not usage + exit."""

    def error(self, message: str) -> Any:
        raise SweepError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pre-trained Distillation over student sizes x methods: run, then report.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,report}")
    run = commands.add_parser(
        "run",
        help="run (or print, or script) every size x method pipeline",
        description="One `python -m bert_mini.main` pipeline per size x method, workdir "
        "ROOT/<size>/<method>, teacher and logits shared in ROOT/shared. Runs whose "
        "results.json exists are skipped.",
    )
    run.add_argument(
        "--config",
        required=True,
        help="pipeline config, optionally with arguments: configs/pd_sst2.py or "
        "configs/pd_glue.py:task=mrpc (the sweep appends student=, method= and runlocal)",
    )
    run.add_argument(
        "--sizes",
        required=True,
        help="comma-separated students (L-4_H-256 or tiny/mini/small/medium/base), or 'all' "
        "for the paper's 24",
    )
    run.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated methods from {','.join(report.METHODS)} (default all)",
    )
    run.add_argument(
        "--root", required=True, help="sweep folder: ROOT/<size>/<method>, ROOT/shared"
    )
    run.add_argument(
        "--runlocal", action="store_true", help="pass runlocal to the config (minutes on a CPU)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. --set train.learning_rate=3e-5 "
        "(becomes --config.train.learning_rate=3e-5); repeatable",
    )
    run.add_argument(
        "--student-init",
        dest="student_inits",
        action="append",
        default=[],
        metavar="SIZE=PATH",
        help="pre-trained student checkpoint for one size, passed to pd/pdf/pf runs as "
        "--config.pipeline.student_init; repeatable",
    )
    run.add_argument(
        "--jobs",
        choices=JOBS,
        default="sequential",
        help="sequential: run here one after another, then write the report; print: one "
        "command per line on stdout; scripts: one executable script per run in ROOT/jobs/",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands that would run (and the scripts that would be written); "
        "run and write nothing",
    )
    run.add_argument(
        "--force", action="store_true", help="include runs whose results.json already exists"
    )
    run.add_argument(
        "--python",
        default=sys.executable,
        help="launcher that runs `-m bert_mini.main ...`, shell-split, e.g. 'python3' or "
        "'srun -n1 python' (default: this interpreter)",
    )
    rep = commands.add_parser(
        "report",
        help="gather ROOT's results.json files into a CSV, a markdown table and PNG plots",
        description="Writes sweep.csv, sweep.md, metric_vs_size.png and heatmap_<method>.png, "
        "and prints the markdown table.",
    )
    rep.add_argument("--root", required=True, help="folder searched recursively for results.json")
    rep.add_argument("--out", default=None, help="folder for the report files (default: ROOT)")
    return parser


def _write_and_print_report(root: str, out: str) -> list[pathlib.Path]:
    results = report.load_results(root)
    written = report.write_report(results, out)
    print(report.markdown_table(results), end="", flush=True)
    print(f"report: {', '.join(str(path) for path in written)}", flush=True)
    return written


def _command_run(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes)
    methods = parse_methods(args.methods)
    runs = build_runs(
        config=args.config,
        sizes=sizes,
        methods=methods,
        root=args.root,
        runlocal=args.runlocal,
        overrides=parse_overrides(args.overrides),
        student_inits=parse_student_inits(args.student_inits, sizes),
        python=args.python,
    )
    todo = [run for run in runs if args.force or not is_done(run)]
    for run in runs:
        if run not in todo:
            print(f"skip {run.size} {run.method}: {run.results_path} exists", file=sys.stderr)
    jobs_dir = _join(args.root, "jobs")
    if args.dry_run or args.jobs == "print":
        for run in todo:
            if args.dry_run and args.jobs == "scripts":
                print(f"# would write {_join(jobs_dir, run.name + '.sh')}")
            print(command_line(run), flush=True)
        return 0
    if args.jobs == "scripts":
        for path in write_scripts(todo, jobs_dir, os.getcwd()):
            print(path, flush=True)
        return 0
    logs_dir = _join(args.root, "logs")
    outcomes = run_sequential(todo, logs_dir)
    lines = summary_lines(outcomes, len(runs) - len(todo), logs_dir)
    try:
        _write_and_print_report(args.root, args.root)
    except (ValueError, FileNotFoundError) as error:
        lines.append(f"report not written: {error}")
    print("\n".join(lines), flush=True)
    return 1 if any(outcome.error for outcome in outcomes) else 0


def _command_report(args: argparse.Namespace) -> int:
    try:
        _write_and_print_report(args.root, args.out or args.root)
    except (ValueError, FileNotFoundError) as error:
        raise SweepError(str(error)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input: one line on stderr and rc 2; failed runs: a summary and rc 1."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise SweepError("give a command: run or report (see --help)")
        return _command_run(args) if args.command == "run" else _command_report(args)
    except SweepError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
