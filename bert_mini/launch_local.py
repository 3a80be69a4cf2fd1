"""N processes of one job on this machine, each with its own fake CPU devices.

    launch/local.sh --processes=2 --devices-per-process=4 -- \\
        --config=configs/finetune_glue.py:task=mrpc,runlocal --workdir=/tmp/bert_mini/mrpc_2x4

This is the multi-host path of a TPU pod or GPU cluster, run on one CPU: every process gets
``BERT_MINI_DISTRIBUTED=1`` and a coordinator on localhost, so ``bert_mini.distributed`` starts
JAX's own distributed runtime (gloo collectives on CPU), and each sees ``--devices-per-process``
local devices of ``processes x devices`` global ones. The same global batch gives the same
results as one process with all the devices, which is what the tests check.

Every output line is prefixed with its process index. When one process fails, the others are
stopped (they would wait for it forever) and the launcher exits with the failed one's status.
"""

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

_DEVICE_FLAG_RE = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def process_env(
    base: Mapping[str, str], *, index: int, processes: int, devices: int, port: int
) -> dict[str, str]:
    """The environment of process ``index``: distributed settings and its fake CPU devices."""
    xla_flags = _DEVICE_FLAG_RE.sub("", base.get("XLA_FLAGS", "")).split()
    xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {
        **base,
        "BERT_MINI_DISTRIBUTED": "1",
        "BERT_MINI_COORDINATOR": f"localhost:{port}",
        "BERT_MINI_NUM_PROCESSES": str(processes),
        "BERT_MINI_PROCESS_ID": str(index),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(xla_flags),
    }


def describe(env: Mapping[str, str], base: Mapping[str, str], command: Sequence[str]) -> str:
    """The exact command line of one process: changed variables, then the command."""
    changed = [
        f"{key}={shlex.quote(value)}" for key, value in env.items() if base.get(key) != value
    ]
    return " ".join(["env", *changed, *map(shlex.quote, command)])


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/local.sh",
        description="Run `python -m bert_mini.main ARGS` as N cooperating CPU processes on this "
        "machine (jax.distributed with a coordinator on localhost), each with fake devices.",
        epilog="Example: launch/local.sh --processes=2 --devices-per-process=4 -- "
        "--config=configs/pretrain_mlm.py:runlocal --workdir=/tmp/bert_mini/mlm_2x4",
    )
    parser.add_argument("--processes", type=int, default=2, help="number of processes (>= 1)")
    parser.add_argument(
        "--devices-per-process", type=int, default=4, help="fake CPU devices per process (>= 1)"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="coordinator port on localhost (0: pick a free one)"
    )
    parser.add_argument(
        "--module", default="bert_mini.main", help="Python module to run (default bert_mini.main)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands without running them"
    )
    parser.add_argument("args", nargs="*", help="arguments for the module (after --)")
    options = parser.parse_args(argv)
    if options.processes < 1:
        parser.error(f"--processes must be >= 1, not {options.processes}")
    if options.devices_per_process < 1:
        parser.error(f"--devices-per-process must be >= 1, not {options.devices_per_process}")
    if not 0 <= options.port < 65536:
        parser.error(f"--port must be in [0, 65535], not {options.port}")
    if not options.args:
        parser.error("give the module's arguments after --, e.g. -- --config=... --workdir=...")
    return options


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
    """Copies one process's output to ours, each line prefixed with ``[index]``."""
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()
    stream.close()


def _stop(processes: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to the processes still running, SIGKILL to those that ignore it."""
    running = [p for p in processes if p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(
    commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], out=sys.stdout
) -> int:
    """Starts every command, streams their output, and returns the first non-zero status (or 0)."""
    lock = threading.Lock()
    processes: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    status = 0
    try:
        for index, (command, env) in enumerate(zip(commands, envs, strict=True)):
            proc = subprocess.Popen(
                list(command),
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            processes.append(proc)
            pump = threading.Thread(target=_pump, args=(index, proc.stdout, out, lock), daemon=True)
            pump.start()
            pumps.append(pump)
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.returncode not in (None, 0)]
            if failed:
                status = failed[0].returncode
                index = processes.index(failed[0])
                with lock:
                    out.write(f"process {index} exited with status {status}; stopping the rest\n")
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(processes)
        for pump in pumps:
            pump.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in processes if p.returncode), 0)
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, like a shell


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = _parse(sys.argv[1:] if argv is None else argv)
    port = options.port or free_port()
    base = dict(os.environ)
    command = [sys.executable, "-m", options.module, *options.args]
    envs = [
        process_env(
            base,
            index=index,
            processes=options.processes,
            devices=options.devices_per_process,
            port=port,
        )
        for index in range(options.processes)
    ]
    for env in envs:
        print(describe(env, base, command), flush=True)
    if options.dry_run:
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a killed launcher takes its processes along
    return run([command] * options.processes, envs)


if __name__ == "__main__":
    sys.exit(main())
