"""Generation speed and memory at the published mini size: our pipeline against min-dalle 0.4.11
(PyTorch, fp32) on the same random weights, and against this machine's roofline, in one run.

    python -m benchmarks.bench_generate            # everything: ~10 min on two quiet cores
    python -m benchmarks.bench_generate --quick    # min-dalle decodes 16 of its 256 tokens per case
                                                   # and the rest is extrapolated: ~4 min
    python -m benchmarks.bench_generate --cases 9 --sides ours

Cases: 1 image and a 3x3 grid (9 candidates), both with super-conditioning (condition_scale 10,
top_k 50, temperature 1): 2 and 18 decoder rows. Weights: DalleBart mini (d_model 1024, 12+12
layers, GLU 2730), the published VQGAN size, CLIP ViT-B/32, drawn with our init and converted to
min-dalle's modules; they are written once to --weights and reused. Every side runs in its own
process (benchmarks/workers.py) so its peak RSS is its own; ours is timed on its second call
(the first compiles; its time is reported too). torch uses 2 threads, XLA its defaults.

The roofline (benchmarks/roofline.py) uses the matmul peak and memory bandwidth measured at the
start and end of this run (the best of each), so a busy machine lowers both sides alike.
Prints a table and writes everything to benchmarks/results/bench_generate-<time>.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import roofline
from benchmarks.workers import mini_configs

ROOT = Path(__file__).resolve().parent.parent
TEXT_LENGTH = 64  # both implementations run every prompt padded to 64 text positions
TARGETS = {"grid_speedup": 6.0, "grid_roofline": 1.5, "single_speedup": 2.5, "rss_over_weights": 1.3}
GIB = 2 ** 30


def run_worker(kind: str, *options: str, env: dict | None = None) -> dict:
    """Runs one worker process; its JSON result, or {"error": ...} with the tail of its output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.workers", kind, "--result", str(result), *options]
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        print(f"  {kind} {' '.join(options)} {shown} ...", end="", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
        print(f" {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode != 0 or not result.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            print("\n".join("    " + line for line in tail), flush=True)
            return {"error": "\n".join(tail)}
        return json.loads(result.read_text())


def pick_openmp_policy(weights: str) -> dict:
    """The faster OpenMP wait policy for min-dalle on this machine right now, by a 4-token probe.

    PyTorch's OpenMP threads spin while waiting; on a machine shared with other busy processes
    that made min-dalle's steps ~14x slower (measured: 3.9 s vs 0.28 s per token), which would
    flatter us. On a quiet machine spinning is the faster choice. Either way min-dalle runs at
    its best, and the policy used is reported.
    """
    probes = {}
    for policy in ("default", "PASSIVE"):
        env = {} if policy == "default" else {"OMP_WAIT_POLICY": policy}
        probe = run_worker("min-dalle", "--weights", weights, "--images", "1", "--tokens", "4", env=env)
        probes[policy] = probe.get("per_token_ms", float("inf"))
    best = min(probes, key=probes.get)
    print(f"  min-dalle per-token probe (ms): {probes}; using {best}", flush=True)
    return {"env": {} if best == "default" else {"OMP_WAIT_POLICY": best}, "probe_per_token_ms": probes}


def roofline_of_case(images: int, machine: dict) -> dict:
    """Seconds per stage at the roofline for `images` candidates with super-conditioning."""
    bart, vqgan, clip = mini_configs()
    peak, bandwidth = machine["peak_flops"], machine["bandwidth_bytes"]
    decode = roofline.decode(bart, 2 * images, TEXT_LENGTH, peak, bandwidth)
    stages = {
        "text_encoding_s": roofline.encoder(bart, 2) / peak,  # the prompt and the empty prompt
        "decode_s": decode["seconds"],
        "vqgan_s": images * roofline.vqgan_decode(vqgan) / peak,
        "clip_s": roofline.clip(clip, images, 1) / peak,
    }
    return {**stages, "end_to_end_s": sum(stages.values()), "per_token_ms": decode["ms_per_token"],
            "decode_flops": decode["flops"], "decode_bytes": decode["bytes"]}


def summarize(results: dict) -> dict:
    """Ratios and target checks from the workers' results."""
    machines = [m for m in (results.get("machine_start"), results.get("machine_end")) if m and "error" not in m]
    if not machines:
        return {}
    machine = {"peak_flops": max(m["peak_flops"] for m in machines),
               "bandwidth_bytes": max(m["bandwidth_bytes"] for m in machines)}
    summary = {"machine": machine, "cases": {}}
    for case, data in results.get("cases", {}).items():
        ours, theirs = data.get("ours", {}), data.get("min-dalle", {})
        line = {"roofline": roofline_of_case(int(case), machine)}
        if "end_to_end_s" in ours:
            line["ours_over_roofline"] = ours["end_to_end_s"] / line["roofline"]["end_to_end_s"]
            line["ours_per_token_over_roofline"] = ours["per_token_ms"] / line["roofline"]["per_token_ms"]
            line["ours_rss_over_weights"] = ours["peak_rss_bytes"] / ours["weights_bytes"]
            line["ours_warm_rss_over_weights"] = ours["peak_rss_warm_call_bytes"] / ours["weights_bytes"]
            if "end_to_end_s" in theirs:
                line["speedup_vs_min_dalle"] = theirs["end_to_end_s"] / ours["end_to_end_s"]
                line["per_token_speedup"] = theirs["per_token_ms"] / ours["per_token_ms"]
        summary["cases"][case] = line
    checks = {}
    grid, single = summary["cases"].get("9", {}), summary["cases"].get("1", {})
    if "speedup_vs_min_dalle" in grid:
        checks["3x3 speed-up vs min-dalle >= 6x"] = grid["speedup_vs_min_dalle"] >= TARGETS["grid_speedup"]
    if "ours_over_roofline" in grid:
        checks["3x3 within 1.5x of the roofline"] = grid["ours_over_roofline"] <= TARGETS["grid_roofline"]
    if "speedup_vs_min_dalle" in single:
        checks["1 image speed-up vs min-dalle >= 2.5x"] = single["speedup_vs_min_dalle"] >= TARGETS["single_speedup"]
    rss = [c["ours_rss_over_weights"] for c in summary["cases"].values() if "ours_rss_over_weights" in c]
    if rss:
        checks["peak RSS <= 1.3x weights"] = max(rss) <= TARGETS["rss_over_weights"]
    summary["targets_met"] = checks
    return summary


def _cell(value, scale=1.0, digits=0, suffix=""):
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def format_table(results: dict, summary: dict) -> str:
    machine = summary.get("machine", {})
    lines = [
        "DalleBart mini + VQGAN f16 16384 + CLIP ViT-B/32, fp32, random weights, condition_scale 10, top_k 50",
        f"machine: matmul peak {_cell(machine.get('peak_flops'), 1e-9)} GFLOP/s, "
        f"read bandwidth {_cell(machine.get('bandwidth_bytes'), 1e-9, 1)} GB/s (best of JAX and PyTorch kernels)",
        "",
    ]
    cases = sorted(results.get("cases", {}), key=int)
    header = f"{'':32s}" + "".join(f"{(c + ' image' if c == '1' else c + ' images'):>36s}" for c in cases)
    sub = f"{'':32s}" + "".join(f"{'min-dalle':>12s}{'ours':>12s}{'roofline':>12s}" for _ in cases)
    lines += [header, sub]
    rows = [  # label, result key, scale to the unit shown, decimals
        ("text encoding (ms)", "text_encoding_ms", 1.0, 0),
        ("per-token decode (ms)", "per_token_ms", 1.0, 1),
        ("VQGAN (ms / image)", "vqgan_ms_per_image", 1.0, 0),
        ("CLIP (ms)", "clip_ms", 1.0, 0),
        ("end to end (s)", "end_to_end_s", 1.0, 1),
        ("first call, with compiling (s)", "first_call_s", 1.0, 1),
        ("peak RSS, process (GiB)", "peak_rss_bytes", 1 / GIB, 2),
        ("peak RSS, warm call (GiB)", "peak_rss_warm_call_bytes", 1 / GIB, 2),
        ("weights (GiB)", "weights_bytes", 1 / GIB, 2),
    ]
    for label, key, scale, digits in rows:
        cells = ""
        for case in cases:
            data = results["cases"][case]
            roof = summary.get("cases", {}).get(case, {}).get("roofline")
            shown = {} if roof is None else {
                "text_encoding_ms": 1e3 * roof["text_encoding_s"], "per_token_ms": roof["per_token_ms"],
                "vqgan_ms_per_image": 1e3 * roof["vqgan_s"] / int(case), "clip_ms": 1e3 * roof["clip_s"],
                "end_to_end_s": roof["end_to_end_s"]}
            for side in ("min-dalle", "ours"):
                cells += f"{_cell(data.get(side, {}).get(key), scale, digits):>12s}"
            cells += f"{_cell(shown.get(key), 1.0, digits):>12s}"
        lines.append(f"{label:32s}{cells}")
    lines.append("")
    for case in cases:
        line = summary.get("cases", {}).get(case, {})
        theirs = results["cases"][case].get("min-dalle", {})
        note = " (min-dalle extrapolated from its first tokens)" if theirs.get("end_to_end_extrapolated") else ""
        lines.append(
            f"{case} image(s): {_cell(line.get('speedup_vs_min_dalle'), 1, 1, 'x')} faster than min-dalle end to end"
            f" ({_cell(line.get('per_token_speedup'), 1, 1, 'x')} per token){note}; "
            f"ours / roofline {_cell(line.get('ours_over_roofline'), 1, 2)} "
            f"(per token {_cell(line.get('ours_per_token_over_roofline'), 1, 2)}); "
            f"peak RSS / weights {_cell(line.get('ours_rss_over_weights'), 1, 2)} "
            f"(warm call {_cell(line.get('ours_warm_rss_over_weights'), 1, 2)})")
    embedded = results.get("embedded", {})
    if "end_to_end_s" in embedded:
        lines.append(f"embedded emoji model, 3x3 grid: {embedded['end_to_end_s']:.1f} s end to end "
                     f"({embedded['per_token_ms']:.1f} ms per token)")
    elif embedded:
        lines.append(f"embedded emoji model: {embedded.get('skipped') or embedded.get('error', '')[-200:]}")
    if "min_dalle_openmp" in results:
        policy = results["min_dalle_openmp"]["env"].get("OMP_WAIT_POLICY", "default")
        lines.append(f"min-dalle OpenMP wait policy: {policy} (the faster in a 4-token probe)")
    knobs = results.get("knobs", {})
    if "sampler_traces" in knobs:
        lines.append(f"changing temperature, top_k, top_p, condition_scale, seed ({knobs['model']} model): "
                     f"{knobs['sampler_traces']} sampler retraces, {knobs['backend_compiles']} XLA compilations")
    for name, met in summary.get("targets_met", {}).items():
        lines.append(f"target {name}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="min-dalle decodes --quick-tokens tokens per case")
    parser.add_argument("--quick-tokens", type=int, default=16)
    parser.add_argument("--cases", default="1,9", help="candidates per case, comma-separated (square numbers)")
    parser.add_argument("--sides", default="ours,min-dalle", help="ours and/or min-dalle")
    parser.add_argument("--no-extras", action="store_true", help="skip the embedded model and the knob sweep")
    parser.add_argument("--weights", default=os.path.join(tempfile.gettempdir(), "dalle-flax-bench-mini"),
                        help="folder for the random weights (written once, reused)")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_generate-<time>.json)")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    tokens = str(args.quick_tokens if args.quick else 256)

    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "cases": {}}
    print("measuring, each side in its own process:", flush=True)
    results["machine_start"] = run_worker("machine")
    results["prepare"] = run_worker("prepare", "--weights", args.weights)
    if "error" in results["prepare"]:
        sys.exit("could not prepare the weights")
    min_dalle_env = {}
    if "min-dalle" in sides:
        results["min_dalle_openmp"] = pick_openmp_policy(args.weights)
        min_dalle_env = results["min_dalle_openmp"]["env"]
    for case in args.cases.split(","):
        data = results["cases"].setdefault(case, {})
        if "ours" in sides:
            data["ours"] = run_worker("ours", "--weights", args.weights, "--images", case)
        if "min-dalle" in sides:
            data["min-dalle"] = run_worker("min-dalle", "--weights", args.weights, "--images", case,
                                           "--tokens", tokens, env=min_dalle_env)
    if not args.no_extras:
        results["embedded"] = run_worker("embedded", "--images", "9")
        results["knobs"] = run_worker("knobs")
    results["machine_end"] = run_worker("machine")
    results["summary"] = summarize(results)
    table = format_table(results, results["summary"])
    results["table"] = table
    print("\n" + table)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_generate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
