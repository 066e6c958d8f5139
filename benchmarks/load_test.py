"""Load test of the live app on loopback: concurrent API clients whose every answer is checked against
the pipeline run here, a full queue that must turn requests away quickly, and the server's memory.

    python -m benchmarks.load_test                  # 32 clients x 16 requests on the embedded model (the
                                                    # long run: ~20 min on two cores, checking included)
    python -m benchmarks.load_test --model FOLDER --clients 8 --requests 3
    python -m benchmarks.load_test --url http://127.0.0.1:7860 --pid 4242
                                                    # a server already running (the same model as --model,
                                                    # on the CPU); no overflow phase; --pid for its memory

Load: `python app.py` is started on a free loopback port (support/app_server.py) with --queue-size and
--concurrency. --clients threads, each with a gradio_client.Client of its own, send --requests /generate
calls one after another; every call has a scene caption and a seed of its own and asks for --num-images
images (the model's default candidates, so the server samples and reranks as the page does). Reported:
requests/s, p50/p95 latency (submit to files downloaded), and the server's RSS (VmRSS) after the
first 50 answers and after 500 (or the last answer).

Overflow: a second server whose queue holds --overflow-queue-size requests gets --overflow-clients
requests at once, more than its queue and running slots hold. Each must be served, or turned away
with Gradio's queue-full error (HTTP 503 "Queue is full. Max size is N ...", gradio_client's QueueError)
within BUSY_WITHIN_S (support/load_client.py); at least one must be turned away; then one more
request must be served.

Check: once the servers are stopped (so it takes no CPU from them), the pipeline is loaded here and
every answer's PNGs must be pixel-identical to `generate(prompt, num_images=k, seed=s)` of its own
request, and its record must name that prompt and seed.

Batching comparison (--compare 1,8,32): one server with `--batching off` and one with `--batching on`
(the same build and flags otherwise; --batch-requests for the batch size) each get the same plan of
--compare-total requests at each client count in turn (spread over that many clients); requests/s and
p50/p95 latency per (mode, clients), every answer checked pixel for pixel as above (a prompt and seed
generated once for both modes). Only this phase runs with --compare.

Passes (exit 0) with every request served and right, none turned away under load, the overflow as
above, and the server's RSS after 500 answers within 10% of that after 50. Everything stops at
--time-limit, counted from the start with the servers' start-up; whatever is unfinished then fails.
Prints a table and writes everything to benchmarks/results/load_test-<time>.json.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

from model.loading import load_pipeline
from support.app_server import AppServer
from support.load_client import (Request, check_answers, load_verdicts, overflow_verdicts, plan_requests, problems,
                                 run_load, run_overflow, summarize)

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20


def _cell(value, digits=0, scale=1.0):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(settings: dict, load: dict, overflow: dict | None, verdicts: dict) -> str:
    summary, rss = load["summary"], load["rss_bytes"]
    burst = overflow["summary"] if overflow else {}
    server = settings["url"] or f"app.py --queue-size {settings['queue_size']} --concurrency {settings['concurrency']}"
    lines = [
        f"/generate, {settings['num_images']} images per request, model {settings['model'] or 'embedded'}, "
        f"server {server}" + (f"; overflow server --queue-size {settings['overflow_queue_size']}" if overflow else ""),
        f"{'':36s}{'load':>18s}{'overflow':>18s}",
    ]
    rows = [
        ("clients x requests", f"{settings['clients']} x {settings['requests']}",
         f"{burst['requests']} x 1, +1 after" if burst else "-"),
        ("served", summary["ok"], burst.get("ok", "-")),
        ("turned away (queue full)", summary["busy"], burst.get("busy", "-")),
        ("failed / lost", f"{summary['errors']} / {summary['lost']}",
         f"{burst['errors']} / {burst['lost']}" if burst else "-"),
        ("wrong / unchecked answers", f"{summary['mismatched']} / {summary['unchecked']}",
         f"{burst['mismatched']} / {burst['unchecked']}" if burst else "-"),
        ("throughput (requests/s)", _cell(summary["throughput_rps"], 2), "-"),
        ("latency p50 / p95 (s)", f"{_cell(summary['p50_s'], 2)} / {_cell(summary['p95_s'], 2)}",
         f"{_cell(burst['p50_s'], 2)} / {_cell(burst['p95_s'], 2)}" if burst else "-"),
        ("slowest turn-away (s)", "-", _cell(burst.get("slowest_busy_s"), 2)),
        ("phase time (s)", _cell(summary["seconds"], 1), _cell(burst.get("seconds"), 1)),
    ]
    lines += [f"{label:36s}{str(first):>18s}{str(second):>18s}" for label, first, second in rows]
    marks = ", ".join(f"{mark}: {_cell(value, 0, 1 / MIB)}" for mark, value in rss.items())
    lines.append(f"server RSS (MiB) at start and after N answers: {marks or '-'}; growth "
                 f"{_cell(load['memory_growth'], 1, 100)}%")
    lines.append("")
    lines += [f"{'PASS' if passed else 'FAIL'}  {name}" for name, passed in verdicts.items()]
    return "\n".join(lines)


def _as_json(request: Request) -> dict:
    """A request for the results file: everything but the pixels."""
    return {key: value for key, value in dataclasses.asdict(request).items() if key != "images"}


@contextlib.contextmanager
def app_server(model, workdir: Path, deadline: float, queue_size: int, concurrency: int):
    """`app.py` on a free loopback port until the block ends; its log tail is printed on failure."""
    server = AppServer(model, workdir, "--queue-size", str(queue_size), "--concurrency", str(concurrency))
    try:
        yield server.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        print(f"server log (tail):\n{server.log()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def run_compare(args, deadline: float) -> dict:
    """The same requests at each client count, first against `--batching off`, then `on`; every answer
    checked. Returns {"runs": [...], "verdicts": {...}, "table": str}."""
    levels = [int(level) for level in args.compare.split(",")]
    plan = plan_requests(args.compare_total * len(levels), args.seed)
    runs = []
    with tempfile.TemporaryDirectory(prefix="load-compare-") as tmp:
        for mode in ("off", "on"):
            flags = ["--queue-size", str(args.queue_size), "--concurrency", str(args.concurrency), "--batching", mode,
                     "--batch-requests", str(args.batch_requests), "--per-caller", "2"]
            server = AppServer(args.model, Path(tmp), *flags)
            try:
                server.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
                for index, clients in enumerate(levels):
                    requests = [dataclasses.replace(r) for r in
                                plan[index * args.compare_total:(index + 1) * args.compare_total]]
                    print(f"batching {mode}: {clients} clients x {len(requests) // clients} requests ...", flush=True)
                    load = run_load(server.url, requests, clients, args.num_images, deadline, Path(tmp))
                    runs.append({"batching": mode, "clients": clients, "seconds": load["seconds"], "requests": requests})
            except BaseException:
                print(f"server log (tail):\n{server.log()}", file=sys.stderr)
                raise
            finally:
                server.stop()
    print("checking every answer against the pipeline run here ...", flush=True)
    check_answers([r for run in runs for r in run["requests"]], load_pipeline(args.model), args.num_images, deadline)
    for run in runs:
        run["summary"] = summarize(run["requests"], run["seconds"])
    for line in problems([r for run in runs for r in run["requests"]]):
        print("  " + line)
    summary = {(run["batching"], run["clients"]): run["summary"] for run in runs}
    verdicts = {"compare: every request served and pixel-identical to generate alone":
                all(s["ok"] == s["requests"] and s["mismatched"] == s["unchecked"] == 0 for s in summary.values())}
    lines = [f"/generate, {args.num_images} images per request, model {args.model or 'embedded'}, "
             f"{args.compare_total} requests per row; on: --batch-requests {args.batch_requests}",
             f"{'clients':>8s}{'batching':>10s}{'requests/s':>12s}{'p50 (s)':>10s}{'p95 (s)':>10s}"
             f"{'served':>8s}{'wrong':>7s}{'speed-up':>10s}"]
    for (mode, clients), s in summary.items():
        off = summary.get(("off", clients), {}).get("throughput_rps")
        gain = s["throughput_rps"] / off if off and s["throughput_rps"] else None
        lines.append(f"{clients:8d}{mode:>10s}{_cell(s['throughput_rps'], 2):>12s}{_cell(s['p50_s'], 2):>10s}"
                     f"{_cell(s['p95_s'], 2):>10s}{s['ok']:>8d}{s['mismatched']:>7d}{_cell(gain, 2):>10s}")
    lines += ["", *(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in verdicts.items())]
    for run in runs:
        run["requests"] = [_as_json(r) for r in run["requests"]]
    return {"runs": runs, "verdicts": verdicts, "table": "\n".join(lines)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per client, one after another")
    parser.add_argument("--num-images", type=int, default=2, help="images per request")
    parser.add_argument("--model", default=os.environ.get("DALLE_MODEL"),
                        help="model folder the server runs and the answers are checked with; default: the "
                             "app's (the embedded model) [env DALLE_MODEL, as app.py]")
    parser.add_argument("--url", help="test this running server instead of starting one (no overflow phase)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--queue-size", type=int, default=64, help="app.py --queue-size for the load phase")
    parser.add_argument("--concurrency", type=int, default=1, help="app.py --concurrency (both phases)")
    parser.add_argument("--overflow-clients", type=int, default=12,
                        help="simultaneous requests in the overflow phase (0: no overflow phase)")
    parser.add_argument("--overflow-queue-size", type=int, default=2, help="app.py --queue-size there")
    parser.add_argument("--compare", help="client counts, e.g. 1,8,32: run only the batching off/on comparison")
    parser.add_argument("--compare-total", type=int, default=32, help="requests per client count in --compare")
    parser.add_argument("--batch-requests", type=int, default=16, help="app.py --batch-requests with batching on")
    parser.add_argument("--seed", type=int, default=0, help="the first request's seed; the others count up")
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for everything, start-up included")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/load_test-<time>.json)")
    args = parser.parse_args(argv)
    if args.url:
        args.overflow_clients = 0  # it needs a server with a small queue, started here
    return args


def run_phases(args, load_requests: list[Request], overflow_requests: list[Request], deadline: float):
    """The load phase, then the overflow phase (when asked for and time is left), each on a server of
    its own unless --url; (load, overflow or None)."""
    overflow = None
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        work = Path(tmp)
        print(f"load: {args.clients} clients x {args.requests} requests ...", flush=True)
        if args.url:
            load = run_load(args.url, load_requests, args.clients, args.num_images, deadline, work, args.pid)
        else:
            with app_server(args.model, work, deadline, args.queue_size, args.concurrency) as server:
                load = run_load(server.url, load_requests, args.clients, args.num_images, deadline, work,
                                server.process.pid)
        if overflow_requests and time.monotonic() < deadline:
            print(f"overflow: {args.overflow_clients} requests at once, queue size {args.overflow_queue_size} ...",
                  flush=True)
            with app_server(args.model, work, deadline, args.overflow_queue_size, args.concurrency) as server:
                overflow = run_overflow(server.url, overflow_requests, args.num_images, deadline, work)
    return load, overflow


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    deadline = time.monotonic() + args.time_limit
    # The servers started here run on the CPU (support/app_server.py); the reference images must come
    # from the same backend to be pixel-identical.
    jax.config.update("jax_platforms", "cpu")
    # Loopback only: gradio_client reports usage to Gradio unless this is off (its analytics_enabled=False
    # alone does not turn it off).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

    if args.compare:
        compare = run_compare(args, deadline)
        print("\n" + compare["table"])
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"load_compare-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"started": started, "argv": sys.argv[1:] if argv is None else argv,
                                   "settings": vars(args), "device": jax.devices()[0].device_kind,
                                   "cpus": os.cpu_count(), **compare}, indent=1))
        print(f"\nwrote {out}")
        return 0 if all(compare["verdicts"].values()) else 1

    load_count = args.clients * args.requests
    planned = plan_requests(load_count + (args.overflow_clients + 1 if args.overflow_clients else 0), args.seed)
    load_requests, overflow_requests = planned[:load_count], planned[load_count:]
    load, overflow = run_phases(args, load_requests, overflow_requests, deadline)

    if time.monotonic() < deadline:
        print("checking every answer against the pipeline run here ...", flush=True)
        check_answers(planned, load_pipeline(args.model), args.num_images, deadline)
    load["summary"] = summarize(load_requests, load["seconds"])
    load["verdicts"] = load_verdicts(load["summary"], load)
    verdicts = dict(load["verdicts"])
    if overflow:
        overflow["summary"] = summarize(overflow_requests[:-1], overflow["seconds"])
        overflow["verdicts"] = overflow_verdicts(overflow["summary"], overflow_requests[-1])
        overflow["busy_messages"] = sorted({r.error for r in overflow_requests if r.status == "busy"})
        verdicts.update(overflow["verdicts"])
    elif overflow_requests:
        verdicts["overflow: run before the time limit"] = False
    table = format_table(vars(args), load, overflow, verdicts)
    print("\n" + table)
    for line in problems(planned):
        print("  " + line)

    results = {"started": started, "argv": sys.argv[1:] if argv is None else argv, "settings": vars(args),
               "table": table, "verdicts": verdicts,
               "load": {**load, "requests": [_as_json(r) for r in load_requests]},
               "overflow": overflow and {**overflow, "requests": [_as_json(r) for r in overflow_requests]}}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"load_test-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
