"""How much shared batches can raise a server's requests/s, in process: the sampler's cost per request
at growing batch sizes next to the per-request work that batching does not share (VQGAN decoding and
CLIP ranking of every candidate), and the requests/s bound they give.

    python -m benchmarks.batching_bound                    # embedded model, requests of 9 candidates
    python -m benchmarks.batching_bound --requests 1,2,4,8,14 --repeats 3

For k requests per batch: sample one batch of k requests (model/batching.py, as the scheduler does),
then each request's `Pipeline.finish` one after another. The bound on requests/s is
k / (sampling time + k x finish time): what a server reaches at best with that batch size, before
HTTP, PNG files and queueing. Ratios are against k = 1 measured in the same run. Prints a table and
writes benchmarks/results/batching_bound-<time>.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax

from model import batching
from model.loading import load_pipeline
from model.pipeline import CHUNK_STEPS
from support.load_client import plan_requests

RESULTS = Path(__file__).resolve().parent / "results"


def timed_batch(pipe, requests) -> tuple[float, float]:
    """(seconds sampling the batch, mean seconds of one request's finish)."""
    started = time.perf_counter()
    batch = batching.start(pipe, requests)
    while batch.done < batch.image_length:
        batching.step(pipe, batch, CHUNK_STEPS)
    codes = batch.host_codes()
    batch.close()
    sampled = time.perf_counter() - started
    started = time.perf_counter()
    for request, span in zip(requests, batch.spans):
        pipe.finish(request, codes[span])
    return sampled, (time.perf_counter() - started) / len(requests)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--requests", default="1,2,4,8,14", help="requests per batch to measure")
    parser.add_argument("--num-images", type=int, default=2, help="images each request asks for")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per size (the best is kept)")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model)
    plans = plan_requests(64)
    rows = []
    for count in (int(c) for c in args.requests.split(",")):
        requests = [pipe.request(p.prompt, seed=p.seed, num_images=args.num_images) for p in plans[:count]]
        timed_batch(pipe, requests)  # compiles this bucket
        sampled, finish = min(timed_batch(pipe, requests) for _ in range(args.repeats))
        rows.append({"requests": count, "rows": sum(batching.row_count(r) for r in requests),
                     "sampling_s": sampled, "finish_s_per_request": finish,
                     "bound_rps": count / (sampled + count * finish)})
    base = rows[0]["bound_rps"]
    lines = [f"model {pipe.name}, {jax.default_backend()} ({os.cpu_count()} cores), {args.num_images} images of "
             f"{pipe.request('x').options.candidates} candidates per request; best of {args.repeats}",
             f"{'requests':>9s}{'rows':>6s}{'sampling (s)':>14s}{'per request':>13s}{'finish (s)':>12s}"
             f"{'bound req/s':>13s}{'vs 1':>7s}"]
    for row in rows:
        lines.append(f"{row['requests']:9d}{row['rows']:6d}{row['sampling_s']:14.3f}"
                     f"{row['sampling_s'] / row['requests']:13.3f}{row['finish_s_per_request']:12.3f}"
                     f"{row['bound_rps']:13.2f}{row['bound_rps'] / base:6.2f}x")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"batching_bound-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": argv, "model": pipe.name, "cpus": os.cpu_count(), "rows": rows,
                               "table": table}, indent=2) + "\n")
    print(f"wrote {out.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
