"""Spreading work over several devices with jax.sharding.

A `Mesh` has a "data" axis (rows of a batch: samples, images) and a "model" axis (DalleBart's weight
matrices split by upstream's partition rules, for models too large for one device). jit follows the
shardings of its inputs, so the pipeline only places arrays; the math is the same code as on one
device, and a row's result does not depend on where it ran.

Multi-host (several machines, e.g. a TPU pod slice): call `jax.distributed.initialize()` on every
host before building the mesh; `make_mesh()` then spans `jax.devices()` across hosts.
"""

import re

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# Batches are padded up to one of these row counts, so a server compiles a handful of shapes.
# 9 is here because a 3x3 grid is the product's default.
ROW_BUCKETS = (1, 2, 4, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128)

# Upstream dalle-mini's rules (model/partitions.py), for the layer-stacked ("scanned") tree: a rule
# matches a window of the parameter path; layer stacks get an extra leading unsharded axis.
_DALLE_BART_RULES = (
    (("embed_positions", "embedding"), P(MODEL, None)),
    (("embed_tokens", "embedding"), P(MODEL, None)),
    (("(q_proj|k_proj|v_proj)", "kernel"), P(None, MODEL)),
    (("out_proj", "kernel"), P(MODEL, None)),
    (("Dense_0", "kernel"), P(None, MODEL)),
    (("GLU.*", "Dense_1", "kernel"), P(None, MODEL)),
    (("GLU.*", "Dense_2", "kernel"), P(MODEL, None)),
    (("(bias|scale)",), P()),
    (("lm_head", "kernel"), P(None, MODEL)),
)
_LAYER_STACKS = ("FlaxBartEncoderLayers", "FlaxBartDecoderLayers")


def make_mesh(model: int = 1, devices=None) -> Mesh | None:
    """A (data, model) mesh over `devices` (default: all); None when there is only one device."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) == 1:
        return None
    if len(devices) % model:
        raise ValueError(f"{len(devices)} devices cannot be split into model-parallel groups of {model}")
    grid = np.array(devices).reshape(len(devices) // model, model)
    return Mesh(grid, (DATA, MODEL))


def data_size(mesh: Mesh | None) -> int:
    """How many ways rows are split; batches are padded to a multiple of it."""
    return 1 if mesh is None else mesh.shape[DATA]


def bucket_rows(rows: int, multiple: int = 1) -> int:
    """The smallest bucket >= rows that `multiple` (the data-parallel device count) divides."""
    for size in ROW_BUCKETS:
        if size >= rows and size % multiple == 0:
            return size
    return -(-rows // multiple) * multiple


def shard_rows(tree, mesh: Mesh | None, axis_of=None):
    """Places every array of `tree` with its row axis split over the mesh's data axis.

    `axis_of(path) -> int` names each leaf's row axis (default 0).
    """
    if mesh is None:
        return tree

    def place(path, x):
        axis = 0 if axis_of is None else axis_of(path)
        return jax.device_put(x, NamedSharding(mesh, P(*([None] * axis), DATA)))

    return jax.tree_util.tree_map_with_path(place, tree)


def _matches(rule, path) -> bool:
    patterns = [re.compile(part + "$") for part in rule]
    return any(all(p.match(k) for p, k in zip(patterns, path[i:])) for i in range(len(path) - len(rule) + 1))


def dalle_bart_partition_specs(params) -> dict:
    """A PartitionSpec for every DalleBart parameter, following upstream's model-parallel rules."""
    specs = {}
    for path in traverse_util.flatten_dict(params):
        spec = next((s for rule, s in _DALLE_BART_RULES if _matches(rule, path)), None)
        if spec is None:
            raise ValueError(f"no partition rule for DalleBart parameter {'/'.join(path)}")
        if any(stack in path for stack in _LAYER_STACKS) and len(spec):
            spec = P(None, *spec)
        specs[path] = spec
    return traverse_util.unflatten_dict(specs)


def _divisible(spec: P, shape, mesh: Mesh) -> P:
    """`spec` with the model axis dropped where it does not divide the dimension (mini's lm_head has
    16385 columns, an odd number; mega pads to 16416 for this reason)."""
    return P(*(axis if axis is None or shape[i] % mesh.shape[axis] == 0 else None for i, axis in enumerate(spec)))


def place_params(params, mesh: Mesh | None, model_parallel_rules: bool = False):
    """Replicates parameters over the mesh, or splits DalleBart's by upstream's rules when the
    mesh has a model axis larger than 1 and `model_parallel_rules` is set."""
    if mesh is None:
        return params
    if model_parallel_rules and mesh.shape[MODEL] > 1:
        specs = dalle_bart_partition_specs(params)
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, _divisible(s, x.shape, mesh))),
                                      params, specs)
    return jax.device_put(params, NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
    """A (possibly sharded) array as one numpy array; across several hosts, gathered from all of them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
