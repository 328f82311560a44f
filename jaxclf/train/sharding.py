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

from jaxclf.config import ConfigError

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
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices (train.mesh_* settings)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of "
                             f"product {known} (data={data} fsdp={fsdp} tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
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


def gather_to_host(tree: Any) -> Any:
    """Host numpy copy of (possibly multi-process sharded) arrays; process-local numpy rows are concatenated."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def any_process(flag: bool) -> bool:
    """True in every process if `flag` is True in any (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.asarray([flag])).any())


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join a multi-process JAX run: from the flags, else from the scheduler's environment, else stay alone.

    With no flags, JAX's own cluster detection decides (jax._src.clusters: SLURM steps, Open MPI,
    GKE TPU jobs, Cloud TPU VMs and pods, Kubernetes Jobs with jax[k8s] installed), and
    JAX_COORDINATOR_ADDRESS asks for a distributed run too. On a plain machine none of them is
    present and the run stays one process, with no coordinator to wait for.
    """
    import os
    from jax._src import clusters  # JAX's detectors; no public API tells whether one of them matches

    if coordinator is None and num_processes is None and process_id is None:
        # The same walk jax.distributed.initialize() makes (mpi4py is opt-in there too).
        detected = next((env.name or env.__name__ for env in clusters.ClusterEnv._cluster_types
                         if not env.opt_in_only_method and env.is_env_present()), None)
        if detected is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            return
        source = f"the {detected} environment" if detected else "JAX_COORDINATOR_ADDRESS"
    else:
        source = "--coordinator/--num-processes/--process-id"
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, TypeError) as e:  # JAX checks the settings before it starts or joins anything
        reason = str(e).rstrip(".")
        raise ConfigError(f"cannot join a multi-process run from {source}: {reason}; give --coordinator "
                          f"HOST:PORT, --num-processes N and --process-id I, or run under a scheduler JAX "
                          f"detects (SLURM, Open MPI, a Cloud TPU VM or pod, a GKE TPU job)") from None
    log.info("process %d of %d joined from %s; %d global devices", jax.process_index(),
             jax.process_count(), source, jax.device_count())
