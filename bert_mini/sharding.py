"""Device mesh, logical-axis rules, sharded initialisation and global batch arrays.

The model names every parameter dimension with a *logical* axis (``vocab``, ``embed``,
``heads``, ``mlp`` or ``None``, see ``bert_mini/model.py``); this module maps those names to
the three *mesh* axes with rules that live in the training config, so one model definition runs
data-parallel, FSDP, tensor-parallel or any mix of them without change:

- ``data``: batch split, parameters replicated (plain data parallelism).
- ``fsdp``: batch split *and* parameters split (ZeRO-3 style; XLA all-gathers them per layer).
- ``tensor``: parameters split along heads / MLP / vocab (Megatron style), batch replicated.

Design choices, and why:

- **Meshes use ``AxisType.Auto``.** ``jax.make_mesh`` defaults to explicit axes, which make
  every op's sharding part of its type; the model is written for the compiler (GSPMD/Shardy) to
  propagate shardings from the jit boundaries, so explicit axes would only add errors.
- **Non-divisible dimensions are replicated, never an error.** A dimension whose size is not a
  multiple of the product of its mesh axes (vocab 30522 over ``tensor=4``, a 3-row token-type
  table over ``fsdp=8``) falls back to replication for *that dimension only*; the others keep
  their split. Uneven shards would need padding, and a crash on a harmless size is worse than a
  little redundant memory for one matrix.
- **A mesh axis is used at most once per array.** When two dimensions map to the same mesh
  axis, the first (leftmost) dimension gets it and the later one is replicated, as Flax linen's
  rule resolution does; JAX rejects a PartitionSpec that repeats an axis.
- **Unknown logical names are replicated.** Leaving a name out of the rules is how a config
  says "keep this replicated" (linen's convention); mesh-axis names in the rules, on the other
  hand, are validated, since a typo there would silently change the layout.
- **Initialise straight into the sharded layout**: ``nnx.eval_shape`` gives shapes and logical
  axes without allocating anything, and a jitted init with ``out_shardings`` lets every device
  create only its own shard, so a model that does not fit one device can still be built.
  The parameters are bit-identical to an unsharded init: JAX's partitionable threefry PRNG makes
  random bits independent of the layout.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# The mesh axes that split the batch; "tensor" holds replicas of the same examples.
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

MeshAxes: TypeAlias = str | tuple[str, ...] | None
Rules: TypeAlias = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


# Mesh
# ------------------------------------------------------------------------------------------------


def _mesh_sizes(shape: Mapping[str, int] | Sequence[int]) -> list[int]:
    """``shape`` as [data, fsdp, tensor] sizes (a mapping may leave axes out: size 1)."""
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
        sizes = [shape.get(name, 1) for name in MESH_AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(MESH_AXES):
            raise ValueError(
                f"mesh shape {tuple(sizes)} must give {len(MESH_AXES)} sizes for {MESH_AXES}"
            )
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"mesh axis {name!r} size must be an int, not {size!r}")
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name!r} size must be positive or -1, not {size}")
    return [int(size) for size in sizes]


def resolve_mesh_shape(
    shape: Mapping[str, int] | Sequence[int], device_count: int
) -> dict[str, int]:
    """Mesh axis sizes with one ``-1`` filled in so their product is ``device_count``."""
    sizes = _mesh_sizes(shape)
    described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
    fill = [i for i, size in enumerate(sizes) if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh shape ({described}) has more than one -1 axis to fill")
    known = math.prod(size for size in sizes if size != -1)
    if fill:
        if device_count % known:
            raise ValueError(
                f"mesh shape ({described}): {device_count} devices are not divisible by "
                f"the other axes' product {known}, so -1 cannot be filled"
            )
        sizes[fill[0]] = device_count // known
    elif known != device_count:
        raise ValueError(
            f"mesh shape ({described}) has {known} devices but there are {device_count}"
        )
    return dict(zip(MESH_AXES, sizes, strict=True))


def make_mesh(
    shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default all); one size may be ``-1``.

    ``shape`` is ``{"data": 2, "tensor": 4}`` (missing axes have size 1) or ``(2, 1, 4)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


# Rules
# ------------------------------------------------------------------------------------------------


def _mesh_axes_tuple(value: Any, logical: str) -> tuple[str, ...]:
    """A rule's right-hand side as a tuple of validated mesh axis names."""
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"sharding rule for {logical!r}: mesh axes must be a name, a list of names or None, "
            f"not {value!r}"
        )
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(
                f"sharding rule for {logical!r}: unknown mesh axis {name!r}; "
                f"mesh axes are {MESH_AXES}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"sharding rule for {logical!r} repeats a mesh axis: {value!r}")
    return tuple(names)


def _rules_dict(rules: Rules | Mapping[str, MeshAxes]) -> dict[str, tuple[str, ...]]:
    """Validated rules as {logical: mesh axes tuple}; a repeated logical name is an error."""
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    table: dict[str, tuple[str, ...]] = {}
    for index, pair in enumerate(pairs):
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"sharding rule #{index} must be a (logical_axis, mesh_axes) pair, not {pair!r}"
            )
        logical, value = pair
        if not isinstance(logical, str):
            raise ValueError(
                f"sharding rule #{index}: logical axis must be a name, not {logical!r}"
            )
        if logical in table:
            raise ValueError(f"sharding rules give logical axis {logical!r} twice")
        table[logical] = _mesh_axes_tuple(value, logical)
    return table


def _as_mesh_axes(names: tuple[str, ...]) -> MeshAxes:
    """PartitionSpec's spelling: None for no axis, a name for one, a tuple for several."""
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def rules_from_config(pairs: Rules | Mapping[str, MeshAxes]) -> tuple[tuple[str, MeshAxes], ...]:
    """Validated, hashable rules from a config's list of ``[logical, mesh_axes]`` pairs.

    Configs hold lists (``[["embed", "fsdp"], ["batch", ["data", "fsdp"]]]``); this turns them into
    tuples and fails on a bad pair, a repeated logical name or an unknown mesh axis (named).
    """
    return tuple((logical, _as_mesh_axes(names)) for logical, names in _rules_dict(pairs).items())


def _logical_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _resolve_spec(
    logical: Sequence[Any],
    table: Mapping[str, tuple[str, ...]],
    shape: Sequence[int] | None,
    mesh_shape: Mapping[str, int] | None,
) -> PartitionSpec:
    used: set[str] = set()
    resolved: list[MeshAxes] = []
    for dim, entry in enumerate(logical):
        axes = tuple(
            axis
            for name in _logical_names(entry)
            for axis in table.get(name, ())
            if axis not in used
        )
        axes = tuple(dict.fromkeys(axes))  # an axis named by two logical names counts once
        divides = (
            shape is None
            or mesh_shape is None
            or shape[dim] % math.prod(mesh_shape[axis] for axis in axes) == 0
        )
        if not divides:
            axes = ()  # replicate this dimension rather than shard unevenly (module docstring)
        used.update(axes)
        resolved.append(_as_mesh_axes(axes))
    return PartitionSpec(*resolved)


def logical_to_mesh_spec(
    logical: PartitionSpec | Sequence[Any],
    rules: Rules | Mapping[str, MeshAxes],
    *,
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
) -> PartitionSpec:
    """The mesh PartitionSpec for one array's logical axes.

    Logical names without a rule are replicated; a mesh axis already taken by an earlier dimension
    is dropped. Given ``shape`` and ``mesh_shape`` (``mesh.shape``), a dimension not divisible by
    its mesh axes' total size is replicated instead.
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    return _resolve_spec(tuple(logical), _rules_dict(rules), shape, mesh_shape)


# Parameter shardings
# ------------------------------------------------------------------------------------------------


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def param_shardings(
    abstract_state: nnx.State, mesh: Mesh, rules: Rules | Mapping[str, MeshAxes]
) -> nnx.State:
    """A NamedSharding for every Variable of ``abstract_state``, in the same State structure.

    ``abstract_state`` comes from ``nnx.split(nnx.eval_shape(...))`` or from real params; the
    result can be given to ``jax.jit`` as ``in_shardings`` / ``out_shardings`` or to
    ``jax.device_put``. Logical axes are read from each Variable's ``out_sharding`` metadata
    (absent: replicated), and dimensions that do not divide evenly are replicated.
    """
    table = _rules_dict(rules)
    mesh_shape = dict(mesh.shape)

    def sharding_of(path: tuple[Any, ...], variable: Any) -> Any:
        if not _is_variable(variable):
            return NamedSharding(mesh, PartitionSpec())
        shape = tuple(getattr(variable.get_value(), "shape", ()))
        logical = variable.get_metadata().get("out_sharding") or ()
        if logical and len(logical) != len(shape):
            raise ValueError(
                f"parameter {_path_name(path)}: logical axes {tuple(logical)} do not match "
                f"its shape {shape}"
            )
        spec = _resolve_spec(tuple(logical), table, shape, mesh_shape)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(sharding_of, abstract_state, is_leaf=_is_variable)


def init_sharded(
    make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | Mapping[str, MeshAxes]
) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds ``make_model()`` directly in the sharded layout: (graphdef, state of sharded arrays).

    ``make_model`` must be deterministic (seeded ``nnx.Rngs`` inside) and build its Variables with
    eager sharding off, as ``bert_mini.model`` does; it is traced once for shapes, once under jit.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = param_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.split(make_model())[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def shard_params(params: nnx.State, mesh: Mesh, rules: Rules | Mapping[str, MeshAxes]) -> nnx.State:
    """Places already-materialised params (e.g. restored from a checkpoint) in the mesh layout."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


# Batches
# ------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; replicated over tensor and other dims."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the data and fsdp axes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """Fails early (one line) when the global batch cannot be split evenly over the mesh."""
    ways = data_parallel_size(mesh)
    if global_batch_size % ways:
        axes = " x ".join(f"{axis}={mesh.shape[axis]}" for axis in BATCH_AXES)
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {ways} "
            f"data-parallel devices ({axes})"
        )


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global, batch-sharded jax.Array per key from this process's rows.

    Each process passes its own ``global_batch_size / process_count`` rows (every key the same
    leading size); the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    arrays: dict[str, jax.Array] = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch key {key!r} is a scalar; every value needs a batch axis")
        try:
            check_batch_divisible(value.shape[0] * jax.process_count(), mesh)
        except ValueError as error:
            raise ValueError(f"batch key {key!r}: {error}") from None
        arrays[key] = jax.make_array_from_process_local_data(sharding, value)
    return arrays
