"""Run in a subprocess with 4 forced CPU devices (XLA_FLAGS must be set before jax starts).

Prints one JSON line: how one device, 4-way data parallel and 2x2 data x model compare, and how the
rows and weights were really spread over the devices (equal images alone would also come from a
pipeline that ignored its mesh).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from model import bart, load_pipeline, sharding  # noqa: E402
from model.checkpoint import load_dalle_bart  # noqa: E402

# How many distinct pieces each array the pipeline placed with sharding.shard_rows was cut into
# during the current run.
_row_pieces = []


def _recording_shard_rows(place):
    def shard_rows(tree, mesh, axis_of=None):
        placed = place(tree, mesh, axis_of)
        for leaf in jax.tree_util.tree_leaves(placed):
            pieces = {tuple(s.indices(n) for s, n in zip(shard.index, leaf.shape)) for shard in leaf.addressable_shards}
            _row_pieces.append(len(pieces))
        return placed
    return shard_rows


def run(pipe):
    """The images of one call, and the distinct row pieces of each array placed during it."""
    _row_pieces.clear()
    result = pipe.generate(["a fox to the left of a butterfly", "three snails"], num_images=3, candidates=5, seed=3)
    images = [(r.codes, np.stack([np.asarray(i) for i in r.images]), np.asarray(r.scores)) for r in result]
    return images, sorted(set(_row_pieces))


def split_fraction(tree) -> float:
    """The largest share of the tree's bytes that one device holds (1: replicated everywhere)."""
    total, per_device = 0, {}
    for leaf in jax.tree_util.tree_leaves(tree):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / total


def main(folder):
    sharding.shard_rows = _recording_shard_rows(sharding.shard_rows)
    single = load_pipeline(folder, mesh=None, compilation_cache=False)
    data = load_pipeline(folder, mesh=sharding.make_mesh(), compilation_cache=False)
    both = load_pipeline(folder, mesh=sharding.make_mesh(model=2), compilation_cache=False)
    reference, _ = run(single)
    report = {}
    for name, pipe in (("data", data), ("data_model", both)):
        out, row_pieces = run(pipe)
        decoder_layers = pipe.bart_params["model"]["decoder"]["layers"]
        report[name] = {
            "codes_equal": all(np.array_equal(a[0], b[0]) for a, b in zip(reference, out)),
            "pixels_equal": all(np.array_equal(a[1], b[1]) for a, b in zip(reference, out)),
            "score_diff": max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(reference, out)),
            "row_pieces": row_pieces,
            # The decoding layout's matrices (bart_decode.decoding_params), as the pipeline holds them.
            "decoder_matrix_split": split_fraction([x for x in jax.tree_util.tree_leaves(decoder_layers)
                                                    if x.ndim == 2]),
        }
    # Teacher-forced logits with DalleBart's weights split over the model axis (upstream's tree: the
    # pipelines hold the decoding layout of bart_decode.decoding_params).
    _, params = load_dalle_bart(f"{folder}/bart")
    split_params = sharding.place_params(params, both.mesh, model_parallel_rules=True)
    ids = np.array([[0, 5, 9, 2] + [1] * 12], np.int32)
    mask = (ids != 1).astype(np.int32)
    config = single.bart_config
    decoder_ids = np.arange(16, dtype=np.int32)[None] % config.image_vocab_size
    ref = bart.decode(params, bart.encode(params, ids, mask, config), mask, decoder_ids, config)
    split = jax.jit(lambda p: bart.decode(p, bart.encode(p, ids, mask, config), mask, decoder_ids,
                                          config))(split_params)
    report["model_parallel_logits_rel_err"] = float(np.abs(np.asarray(split) - np.asarray(ref)).max()
                                                    / max(1.0, float(np.abs(np.asarray(ref)).max())))
    layers = split_params["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    report["split_attention_kernel_split"] = split_fraction(layers["FlaxBartAttention_0"]["q_proj"]["kernel"])
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
