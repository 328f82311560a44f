"""Device mesh, logical-axis rules and global batches.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `mlp`; see jaxclf.model).
One rules table maps them onto the mesh axes (`data`, `fsdp`, `tensor`); the batch is sharded
over (`data`, `fsdp`). The same code runs on one CPU, on simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) and on a multi-host TPU/GPU pod.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis. Weights are split over `fsdp` along the model width and over
# `tensor` along heads/MLP/vocab (Megatron-style); `data` only replicates them.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of "
                             f"product {known} (data={data} fsdp={fsdp} tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, but {len(devices)} are available")
    mesh_devices = np.asarray(devices).reshape(sizes)
    return Mesh(mesh_devices, MESH_AXES)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with logical axis `names`; a dim the mesh axis doesn't divide is replicated."""
    spec = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name else None
        if axis is not None and (mesh.shape[axis] == 1 or dim % mesh.shape[axis] != 0):
            axis = None
        spec.append(axis)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of an nnx.State (Params use their logical names; others replicate)."""

    def leaf_sharding(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or ()
            value = x.get_value()
            spec = logical_spec(names, value.shape, mesh) if names else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def like_params_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree holding copies of the params (optimiser moments): a leaf whose path ends
    with a parameter's path and has its shape gets that parameter's sharding; the rest replicate."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (np.shape(p), s)

    def leaf(path, x):
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == np.shape(x):
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join a multi-process JAX run; with no arguments, let JAX auto-detect (TPU VMs, SLURM)."""
    if coordinator is None and num_processes is None and process_id is None:
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d joined via %s; %d global devices", jax.process_index(),
             jax.process_count(), coordinator, jax.device_count())
