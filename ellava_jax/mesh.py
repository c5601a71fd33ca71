"""The device mesh and what each array of a search is split on.

Two axes (MaxText's and levanter's naming, reduced to what a pruning search holds):

  data   the population's candidates (the fitness and the projector step run candidates
         side by side) and, where a step has no candidates, the rows of its batch;
  model  the decoder's weights, tensor-parallel: q/k/v/gate/up split over their output
         columns, o/down over their input rows (each device holds 1/model of every layer, the
         attention heads and the MLP width divided, Megatron-style), and the level database's
         [L, K, in, out] stacks the same way (a candidate's kernel is split like the weight).

A dimension the model axis does not divide (the toy's 2 KV heads over 4 devices) is not split:
that weight is replicated and `mesh_notes` says so in a line. Everything else (embeddings, the
head, norms, the vision tower and projector) is replicated: small beside the decoder. XLA's
partitioner (GSPMD) inserts the collectives; the program is the one-device program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ellava_jax.errors import UserError

AXES = ("data", "model")
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split over output columns
ROW = ("o_proj", "down_proj")  # split over input rows


def parse_mesh(text: str | Mapping | None) -> dict[str, int] | None:
    """'data=2,model=4' (or a mapping, or None) -> {"data": 2, "model": 4}; axes not named are 1."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).replace(" ", "").split(","):
            name, eq, size = part.partition("=")
            if not eq:
                raise UserError(f"mesh {text!r}: expected axis=size pairs, such as data=2,model=4")
            items.append((name, size))
    out = {}
    for name, size in items:
        if name not in AXES:
            raise UserError(f"mesh axis {name!r}: expected one of {', '.join(AXES)}")
        try:
            n = int(size)
        except (TypeError, ValueError):
            raise UserError(f"mesh axis {name}={size!r}: expected a positive integer") from None
        if n < 1:
            raise UserError(f"mesh axis {name}={n}: expected a positive integer")
        out[name] = n
    return {a: out.get(a, 1) for a in AXES}


def make_mesh(spec: Mapping | str | None = None, devices=None) -> Mesh:
    """The mesh of `spec` over `devices` (default: every device of every process); no spec:
    all on data.

    Devices are ordered by process, then id, so that the model axis (the innermost) stays
    inside one process's devices: its collectives run at every layer and belong on a host's
    own links (ICI), while the data axis crosses hosts (a model axis that would span
    processes is refused).
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    sizes = parse_mesh(spec) or {"data": len(devices), "model": 1}
    need = math.prod(sizes.values())
    shown = ",".join(f"{a}={n}" for a, n in sizes.items())
    if need != len(devices):
        where = "this process sees" if jax.process_count() == 1 else "the processes see"
        raise UserError(
            f"mesh {shown} needs {need} devices; {where} {len(devices)} ({devices[0].platform})"
        )
    local = len(devices) // max(len({d.process_index for d in devices}), 1)
    if sizes["model"] > 1 and local % sizes["model"]:
        raise UserError(
            f"mesh {shown}: the model axis would span processes (each has {local} devices); "
            f"choose model dividing {local}, the processes side by side on data"
        )
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES)


def local_devices(mesh: Mesh) -> list:
    """The mesh's devices that belong to this process."""
    me = jax.process_index()
    return [d for d in mesh.devices.flat if d.process_index == me]


def to_host(x) -> np.ndarray:
    """A numpy copy of `x`; an array whose shards live partly in other processes is gathered
    from them (every process must call this at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not _covered_here(x):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _index_key(index) -> tuple:
    """A shard's index (a tuple of slices) as a hashable key."""
    return tuple((s.start, s.stop, s.step) for s in index)


def _covered_here(x: jax.Array) -> bool:
    """Whether this process's shards of `x` hold every element (split over a model axis inside
    the process, replicated over a data axis across processes)."""
    mine = {_index_key(s.index) for s in x.addressable_shards}
    return all(_index_key(i) in mine for i in x.sharding.devices_indices_map(x.shape).values())


def place(x, sharding):
    """`x` (numpy, or an array on this process's devices) on `sharding`; a sharding over other
    processes' devices too takes it from the host (each process holds the same value)."""
    if sharding.is_fully_addressable or not isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    if x.sharding == sharding:
        return x
    return jax.device_put(to_host(x), sharding)


def to_device(x, device):
    """`x` whole on one of this process's devices (gathered from a mesh first if need be)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = to_host(x)
    return jax.device_put(x, device)


def _units(config, matrix: str) -> tuple[int, str]:
    """What the model axis divides for `matrix`: attention heads (KV heads for k/v), or the MLP
    width; with its name for a line."""
    t, matrix = config.text, matrix.rsplit(".", 1)[-1]
    if matrix in ("k_proj", "v_proj"):
        return t.num_key_value_heads, "KV heads"
    if matrix in ("q_proj", "o_proj"):
        return t.num_attention_heads, "attention heads"
    return t.intermediate_size, "MLP columns"


def kernel_spec(config, matrix: str, ndim: int, mesh: Mesh) -> P:
    """The split of a decoder kernel with trailing dims [in, out] (stacked [L, in, out]; the
    database's [L, K, in, out] or [K, in, out]): q/k/v/gate/up over their output columns, o/down
    over their input rows, whole heads per device; replicated when the model axis does not
    divide the heads or the MLP width."""
    n = mesh.shape["model"]
    units, _ = _units(config, matrix)
    if n == 1 or units % n:
        return P()
    spec = [None] * ndim
    spec[ndim - 1 if matrix.rsplit(".", 1)[-1] in COLUMN else ndim - 2] = "model"
    return P(*spec)


def mesh_notes(config, mesh: Mesh) -> list[str]:
    """One line per decoder matrix the model axis cannot split (replicated instead)."""
    from ellava_jax.prune.masks import MATRICES

    n = mesh.shape["model"]
    out = []
    for m in MATRICES:
        units, what = _units(config, m)
        if n > 1 and units % n:
            out.append(f"{m}: {units} {what} do not divide over model={n}: replicated")
    return out


def param_specs(config, params: dict, mesh: Mesh) -> dict:
    """A PartitionSpec per leaf of a model's params (arrays or ShapeDtypeStructs): the decoder's
    kernels split (`kernel_spec`), the rest replicated."""
    from ellava_jax.prune.masks import MATRICES

    def spec(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if "layers" in keys and keys[-1] == "kernel":
            matrix = next((m for m in MATRICES if m.rsplit(".", 1)[-1] in keys), None)
            if matrix is not None:
                return kernel_spec(config, matrix, len(x.shape), mesh)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(config, params: dict, mesh: Mesh) -> dict:
    """The params placed on the mesh (`param_specs`)."""
    specs = param_specs(config, params, mesh)
    return jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), params, specs)


def shard_kernels(config, stacks: Mapping, mesh: Mesh) -> dict:
    """Level stacks ({matrix: [..., K, in, out]}, host or device) placed on the mesh."""
    return {
        m: place(x, NamedSharding(mesh, kernel_spec(config, m, x.ndim, mesh)))
        for m, x in stacks.items()
    }


def data_spec(n: int, mesh, ndim: int) -> P:
    """A leading axis of size n over the data axis when the axis divides it, else replicated."""
    d = mesh.shape["data"]
    if d == 1 or n % d:
        return P()
    return P("data", *([None] * (ndim - 1)))


def over_data(x):
    """`x` with its leading axis split over the data axis of the mesh being traced under (none,
    or one that does not divide it: unchanged). The population's candidates, in a program."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return x
    spec = data_spec(x.shape[0], mesh, x.ndim)
    return x if spec == P() else jax.lax.with_sharding_constraint(x, spec)


def state_spec(shape, mesh) -> P:
    """The split of the population's hidden state between layers, [P, N, T, H]: candidates
    over data and rows over model, each where the axis divides it (each model device keeps a
    share of the rows instead of a copy of all; a layer's blocks gather theirs)."""
    d, m = mesh.shape["data"], mesh.shape["model"]
    return P(
        "data" if d > 1 and shape[0] % d == 0 else None,
        "model" if m > 1 and shape[1] % m == 0 else None,
    )


def population_state(x):
    """`x` (the population's hidden state) split as `state_spec` says, on the mesh being traced
    under (none: unchanged)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return x
    spec = state_spec(x.shape, mesh)
    return x if spec == P(None, None) else jax.lax.with_sharding_constraint(x, spec)


@dataclasses.dataclass
class HostShards:
    """An array's shards of this process, copied to host memory (each once: a replica's
    other copies are not kept), with what `from_host` needs to rebuild it. One process's
    share only: with several processes each offloads and restores its own."""

    shape: tuple
    sharding: jax.sharding.Sharding
    copies: dict  # shard index key -> numpy copy
    devices: list  # (device, shard index key) of each addressable shard

    @classmethod
    def of(cls, x: jax.Array) -> HostShards:
        copies, devices = {}, []
        for s in x.addressable_shards:
            k = _index_key(s.index)
            if k not in copies:
                copies[k] = np.asarray(s.data)
            devices.append((s.device, k))
        return cls(x.shape, x.sharding, copies, devices)


def from_host(x: HostShards) -> jax.Array:
    """The array `HostShards.of` copied, back on its devices with its sharding."""
    arrays = [jax.device_put(x.copies[k], d) for d, k in x.devices]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)
