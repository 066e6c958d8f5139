"""Run in a subprocess with 4 forced CPU devices (XLA_FLAGS must be set before jax starts).

Prints one JSON line of comparisons between one device, 4-way data parallel and 2x2 data x model.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from model.pipeline import load_pipeline  # noqa: E402
from model.sharding import make_mesh  # noqa: E402


def run(pipe):
    result = pipe.generate(["a fox to the left of a butterfly", "three snails"], num_images=3, candidates=5, seed=3)
    return [(r.codes, np.stack([np.asarray(i) for i in r.images]), np.asarray(r.scores)) for r in result]


def main(folder):
    single = load_pipeline(folder, mesh=None, compilation_cache=False)
    data = load_pipeline(folder, mesh=make_mesh(), compilation_cache=False)
    both = load_pipeline(folder, mesh=make_mesh(model=2), compilation_cache=False)
    reference = run(single)
    report = {"devices": len(jax.devices())}
    for name, pipe in (("data", data), ("data_model", both)):
        out = run(pipe)
        report[name] = {
            "codes_equal": all(np.array_equal(a[0], b[0]) for a, b in zip(reference, out)),
            "pixels_equal": all(np.array_equal(a[1], b[1]) for a, b in zip(reference, out)),
            "score_diff": max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(reference, out)),
        }
    # Teacher-forced logits with DalleBart's weights split over the model axis (upstream's tree: the
    # pipelines hold the decoding layout of bart.decoding_params).
    from model import bart
    from model.checkpoint import load_dalle_bart
    from model.sharding import place_params

    _, params = load_dalle_bart(f"{folder}/bart")
    split_params = place_params(params, both.mesh, model_parallel_rules=True)
    ids = np.array([[0, 5, 9, 2] + [1] * 12], np.int32)
    mask = (ids != 1).astype(np.int32)
    decoder_ids = np.arange(16, dtype=np.int32)[None] % single.bart_config.image_vocab_size
    ref = bart.decode(params, bart.encode(params, ids, mask, single.bart_config), mask, decoder_ids, single.bart_config)
    split = jax.jit(lambda p: bart.decode(p, bart.encode(p, ids, mask, both.bart_config), mask, decoder_ids,
                                          both.bart_config))(split_params)
    report["model_parallel_logits_rel_err"] = float(np.abs(np.asarray(split) - np.asarray(ref)).max()
                                                    / max(1.0, float(np.abs(np.asarray(ref)).max())))
    layers = split_params["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    report["sharded_param_example"] = str(layers["FlaxBartAttention_0"]["q_proj"]["kernel"].sharding.spec)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
