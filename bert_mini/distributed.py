"""Multi-host start-up: JAX's own distributed runtime, started when asked or detected.

Only ``main.py`` calls this module; every other module sees a multi-host run through
``jax.process_index()`` / ``jax.process_count()`` and global arrays, never through how the
hosts found each other. Which start applies, in order:

- ``BERT_MINI_DISTRIBUTED=1`` (set by the ``launch/`` scripts) or ``main.py --jax_distributed``:
  initialise, with ``BERT_MINI_COORDINATOR`` (``host:port`` of process 0),
  ``BERT_MINI_NUM_PROCESSES`` and ``BERT_MINI_PROCESS_ID`` where given; what is left unset JAX
  detects itself (Cloud TPU metadata, SLURM, Open MPI).
- ``BERT_MINI_DISTRIBUTED=0``: never initialise (one process, whatever the environment says).
- Unset (or ``auto``): initialise only when JAX's cluster detection finds a Cloud TPU VM, a SLURM
  step with more than one task, or an Open MPI job, so the same command runs unchanged on a
  laptop, a TPU pod slice and under ``srun``.

On CPU the processes need cross-process collectives (gloo) and their fake device count set
before JAX starts (``--xla_force_host_platform_device_count``, set by ``launch/local.sh``).
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

_log = logging.getLogger("bert_mini")

ENV_SWITCH = "BERT_MINI_DISTRIBUTED"
ENV_COORDINATOR = "BERT_MINI_COORDINATOR"
ENV_NUM_PROCESSES = "BERT_MINI_NUM_PROCESSES"
ENV_PROCESS_ID = "BERT_MINI_PROCESS_ID"

_SWITCH_VALUES = ("", "auto", "0", "1")
# JAX ClusterEnv names worth starting for without being asked ("k8s" needs the kubernetes
# package and fires in any pod; "mpi4py" is opt-in in JAX itself).
_AUTO_CLUSTERS = ("tpu", "gcetpu", "gketpu", "slurm", "ompi")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the environment asks for; ``None`` leaves a value to JAX's detection."""

    switch: str = ""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        switch = environ.get(ENV_SWITCH, "").strip().lower()
        if switch not in _SWITCH_VALUES:
            raise ValueError(f"{ENV_SWITCH}={environ[ENV_SWITCH]!r}: use 1, 0 or auto")
        coordinator = environ.get(ENV_COORDINATOR, "").strip() or None
        if coordinator is not None:
            host, sep, port = coordinator.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port")
        num_processes = _int_env(environ, ENV_NUM_PROCESSES, minimum=1)
        process_id = _int_env(environ, ENV_PROCESS_ID, minimum=0)
        if num_processes is not None and process_id is not None and process_id >= num_processes:
            raise ValueError(
                f"{ENV_PROCESS_ID}={process_id} is not below {ENV_NUM_PROCESSES}={num_processes}"
            )
        return cls(switch, coordinator, num_processes, process_id)


def _int_env(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return int(raw)


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The name of the multi-process cluster JAX's own detection sees here, or None.

    A SLURM allocation with a single task is not a multi-process job (JAX would pin that task to
    one GPU), so it does not count.
    """
    try:
        from jax._src import clusters  # JAX's detection; private, so guarded
    except ImportError:  # pragma: no cover - a JAX without it
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", []):
        name = getattr(env, "name", "")
        if name not in _AUTO_CLUSTERS:
            continue
        try:
            present = env.is_env_present()
        except Exception as error:  # a broken probe must not stop a single-host run
            _log.warning("cluster detection %s failed: %s", name, error)
            continue
        if not present:
            continue
        if name == "slurm" and int(environ.get("SLURM_NTASKS", "1") or 1) <= 1:
            continue
        return name
    return None


def should_initialize(
    settings: Settings, requested: bool, detect: Any = detected_cluster
) -> tuple[bool, str]:
    """(start?, why): the decision of ``maybe_initialize``, kept pure for the tests."""
    if settings.switch == "0":
        if requested:
            raise ValueError(f"--jax_distributed contradicts {ENV_SWITCH}=0")
        return False, f"{ENV_SWITCH}=0"
    if settings.switch == "1":
        return True, f"{ENV_SWITCH}=1"
    if requested:
        return True, "--jax_distributed"
    cluster = detect()
    if cluster:
        return True, f"detected cluster: {cluster}"
    return False, "no multi-process cluster detected"


def maybe_initialize(requested: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
    """Calls ``jax.distributed.initialize`` when asked or detected; True if it did.

    Must run before anything touches a JAX backend (no arrays, no ``jax.devices()`` yet).
    """
    settings = Settings.from_env(environ)
    start, why = should_initialize(settings, requested)
    if not start:
        _log.debug("single process (%s)", why)
        return False
    if jax.distributed.is_initialized():
        return True
    if not jax.config.jax_cpu_collectives_implementation:  # older JAX: none by default
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _log.info(
        "jax.distributed.initialize (%s): coordinator=%s num_processes=%s process_id=%s",
        why,
        settings.coordinator or "auto",
        settings.num_processes if settings.num_processes is not None else "auto",
        settings.process_id if settings.process_id is not None else "auto",
    )
    jax.distributed.initialize(
        coordinator_address=settings.coordinator,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
    )
    return True


def topology() -> dict[str, Any]:
    """This process's place in the job: index, count, and its local and global devices."""
    local = jax.local_devices()
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "platform": jax.default_backend(),
        "local_device_count": len(local),
        "global_device_count": jax.device_count(),
        "local_devices": [str(device) for device in local],
    }


def log_topology() -> dict[str, Any]:
    """Logs ``topology()`` on every process (a missing host shows up as a missing line)."""
    info = topology()
    _log.info(
        "process %d/%d on %s: %d local / %d global devices %s",
        info["process_index"],
        info["process_count"],
        info["platform"],
        info["local_device_count"],
        info["global_device_count"],
        info["local_devices"],
    )
    return info
