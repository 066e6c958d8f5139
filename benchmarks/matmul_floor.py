"""How fast can a mini decoding step's matrix products alone run on this machine? A floor for issue 3.

    python -m benchmarks.matmul_floor            # ~2 min on two quiet cores

A cached decoding step of DalleBart mini multiplies the rows' hidden states by every decoder weight
(per layer: self-attention q, k, v, out; cross-attention q, out; the GLU's two inputs and its output)
and then by the LM head. This script times exactly those products, chained layer by layer as in the
model, with nothing else (no attention over the cache, no norms, no sampling), at 2 rows (one image
with super-conditioning) and 18 rows (a 3x3 grid), and compares them with the roofline of the same
work (benchmarks/roofline.py: the larger of FLOPs / matmul peak and weight bytes / bandwidth, both
measured in this run). Variants: XLA with this project's compiler options, XLA's defaults, the q/k/v
and GLU-input products fused into one wider product each, and PyTorch (2 threads, MKL/oneDNN).

Whatever the full step does beyond these products comes on top, so the best variant's time is a
lower bound on our per-token time at that shape with these kernels.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import roofline
from benchmarks.workers import mini_configs

ROWS = (2, 18)
REPEATS = 20


def _weights(d, ffn, layers, vocab, fused):
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

    blocks = []
    for _ in range(layers):
        if fused:
            blocks.append({"qkv": w(d, 3 * d), "o": w(d, d), "cq": w(d, d), "co": w(d, d), "fin": w(d, 2 * ffn),
                           "fout": w(ffn, d)})
        else:
            blocks.append({"q": w(d, d), "k": w(d, d), "v": w(d, d), "o": w(d, d), "cq": w(d, d), "co": w(d, d),
                           "f0": w(d, ffn), "f1": w(d, ffn), "fout": w(ffn, d)})
    return blocks, w(d, vocab)


def _step(x, blocks, head, ops):
    """The step's products, each feeding the next through a cheap residual so none can be skipped."""
    for p in blocks:
        if "qkv" in p:
            q, k, v = ops.split(x @ p["qkv"], 3)
            gate, value = ops.split(x @ p["fin"], 2)
        else:
            q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
            gate, value = x @ p["f0"], x @ p["f1"]
        x = x + (q + k + v) @ p["o"]
        x = x + (x @ p["cq"]) @ p["co"]
        x = x + (gate * value) @ p["fout"]
        x = x * 0.5
    return x @ head


def _best_ms(run):
    return 1e3 * roofline.best_seconds(run, REPEATS)


def time_jax(rows, fused, options, shape):
    import jax
    import jax.numpy as jnp

    class Ops:
        split = staticmethod(lambda a, n: jnp.split(a, n, axis=-1))

    blocks, head = _weights(*shape, fused)
    blocks, head = jax.device_put((blocks, head))
    step = jax.jit(lambda x, b, h: _step(x, b, h, Ops), compiler_options=options)
    x = jnp.ones((rows, shape[0]), jnp.float32)
    return _best_ms(lambda: step(x, blocks, head).block_until_ready())


def time_torch(rows, fused, shape, threads=2):
    import torch

    torch.set_num_threads(threads)

    class Ops:
        split = staticmethod(lambda a, n: torch.chunk(a, n, dim=-1))

    blocks, head = _weights(*shape, fused)
    blocks = [{k: torch.from_numpy(v) for k, v in b.items()} for b in blocks]
    head = torch.from_numpy(head)
    x = torch.ones(rows, shape[0])
    with torch.inference_mode():
        return _best_ms(lambda: _step(x, blocks, head, Ops))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    from model import xla_options

    config = mini_configs()[0]
    shape = (config.d_model, config.decoder_ffn_dim, config.decoder_layers, config.image_vocab_size + 1)
    machine = roofline.measure_machine()
    variants = {
        "XLA, project options": lambda rows: time_jax(rows, False, xla_options.compiler_options(), shape),
        "XLA, project options, fused q/k/v and GLU in": lambda rows: time_jax(rows, True, xla_options.compiler_options(), shape),
        "XLA defaults": lambda rows: time_jax(rows, False, None, shape),
        "PyTorch, 2 threads": lambda rows: time_torch(rows, False, shape),
        "PyTorch, 2 threads, fused": lambda rows: time_torch(rows, True, shape),
    }
    weights = roofline.decoder_weights(config)
    table = {}
    for rows in ROWS:
        flops, weight_bytes = 2 * rows * weights, roofline.FLOAT_BYTES * weights
        bound = 1e3 * max(flops / machine["peak_flops"], weight_bytes / machine["bandwidth_bytes"])
        table[rows] = {"roofline_ms": bound, "gflops": flops / 1e9, "weight_gb": weight_bytes / 1e9,
                       "variants": {name: run(rows) for name, run in variants.items()}}

    print(f"matmul peak {machine['peak_flops'] / 1e9:.0f} GFLOP/s, bandwidth {machine['bandwidth_bytes'] / 1e9:.1f} GB/s")
    header = " | ".join(f"{r} rows: ms (x roofline)" for r in ROWS)
    print(f"| variant | {header} |")
    print("|---|" + "---|" * len(ROWS))
    bounds = " | ".join(f"{table[r]['roofline_ms']:.1f}" for r in ROWS)
    print(f"| roofline of these products | {bounds} |")
    for name in variants:
        cells = " | ".join(f"{table[r]['variants'][name]:.1f} ({table[r]['variants'][name] / table[r]['roofline_ms']:.2f}x)"
                           for r in ROWS)
        print(f"| {name} | {cells} |")
    out = args.out or Path("benchmarks/results") / f"matmul_floor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": table}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
