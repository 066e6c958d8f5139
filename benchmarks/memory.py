"""Device memory of the published models before loading them: python -m benchmarks.memory

For mini and mega, each dtype, and one image or a 3x3 grid (super-conditioned: 2 or 18 decoder rows),
prints weights, KV cache, the largest stage's temporaries (XLA's compiled memory analysis of the
sampling chunk, the VQGAN decoding one image and CLIP scoring the images; model/memory.py) and the
total, with load_pipeline's shape-only bound beside it; writes benchmarks/results/memory-<time>.json.
Nothing is allocated: every stage is lowered from jax.ShapeDtypeStructs and compiled for this CPU.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from model import memory
from model.bart import DalleBartConfig
from model.clip import CLIPConfig
from model.vqgan import VQGANConfig

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS_GB = {("mega", "float16", 9): 12.0, ("mini", "float16", 9): 4.0}  # the targets
GRID = {1: "1 image", 9: "3x3 grid"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mini,mega")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = parser.parse_args(argv)
    rows, started = [], time.time()
    print(f"{'model':5} {'dtype':9} {'request':9} {'weights':>8} {'cache':>7} {'temps':>7} {'total':>7} "
          f"{'bound':>7} {'target':>7}  (GB; temps = largest stage: sampling/vqgan/clip)")
    for model in args.models.split(","):
        bart = {"mini": DalleBartConfig.mini, "mega": DalleBartConfig.mega}[model]()
        for dtype in args.dtypes.split(","):
            for images in (1, 9):
                t = time.time()
                need = memory.estimate(bart, VQGANConfig(), CLIPConfig(), dtype, images=images)
                bound = memory.estimate(bart, VQGANConfig(), CLIPConfig(), dtype, images=images, measure=False)
                target = TARGETS_GB.get((model, dtype, images))
                temps = need.parts["temporaries"]
                print(f"{model:5} {dtype:9} {GRID[images]:9} {need.weights / 1e9:8.2f} {need.cache / 1e9:7.3f} "
                      f"{need.temporaries / 1e9:7.3f} {need.total / 1e9:7.2f} {bound.total / 1e9:7.2f} "
                      f"{'<= %.0f' % target if target else '':>7}  ({temps['sampling'] / 1e6:.0f}/"
                      f"{temps['vqgan'] / 1e6:.0f}/{temps['clip'] / 1e6:.0f} MB, {time.time() - t:.0f} s)", flush=True)
                rows.append({"model": model, **need.to_dict(), "bound_total": bound.total,
                             "bound_temporaries": bound.parts["temporaries"], "target_gb": target,
                             "meets_target": None if target is None else need.total <= target * 1e9})
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": "python -m benchmarks.memory", "jax": jax.__version__,
                               "backend": jax.default_backend(), "machine": platform.machine(),
                               "seconds": round(time.time() - started, 1), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
