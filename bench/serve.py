"""Closed-loop HTTP load on one local `adaptive-m3 serve` replica: adaptive vs the largest scale,
batching on vs off, at several concurrencies, side by side in one run.

    python bench/serve.py [--router DIR] [--model tiny-m3] [--concurrency 1,8,32,128]

The router is --router, else runs/quickstart/router if the quickstart ran, else a small
quickstart (150 calib images) trained here into runs/bench-serve. Two apps run side by side, one
replica each: batching on, and off (batches of one). Each of C client threads sends a request,
waits for the answer and sends the next (closed loop) over a kept-alive connection, cycling
through the synthetic test split's questions as data: URIs. Throughput is answers per second
over the level; latencies are per request. The references are `AdaptiveLMM.generate` in this
process with the replica's thread count: one sample per call (latency) and batches (the
throughput ceiling without HTTP). Rounds interleave every configuration and report medians, so
load from other processes on a shared machine hits all of them alike.
Targets: adaptive >= 2x the largest scale's throughput at each concurrency, batching >= 3x
unbatched at 32, p95 at concurrency 1 <= 1.5x generate's single-sample p95.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from predictor.routers.probe_router import PROBE_JSON
from predictor.routers.scale_router import ROUTER_JSON

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def is_router_folder(folder: Path) -> bool:
    """A plain router or a probe router folder."""
    return (folder / ROUTER_JSON).is_file() or (folder / PROBE_JSON).is_file()


def find_router(args) -> Path:
    if args.router:
        return Path(args.router)
    quickstart = Path("runs/quickstart/router")
    if is_router_folder(quickstart):
        return quickstart
    from pipelines.quickstart import QuickstartConfig, run_quickstart

    out = Path("runs/bench-serve")
    if not is_router_folder(out / "router"):
        print("no router given and no runs/quickstart: training a small one into runs/bench-serve")
        run_quickstart(QuickstartConfig(out=str(out), calib_images=150, test_images=12, workers=0))
    return out / "router"


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def offline_single(model, images, questions, n: int, max_tokens: int, scale="auto") -> list[float]:
    """Seconds per `AdaptiveLMM.generate` call on one sample, over the first n samples."""
    times = []
    for i in range(min(n, len(questions))):
        start = time.perf_counter()
        model.generate(
            images[i : i + 1], questions[i : i + 1], scale=scale, max_new_tokens=max_tokens
        )
        times.append(time.perf_counter() - start)
    return times


def session_processes(temp_dir: str) -> dict[int, str]:
    """pid -> role of every process of our Ray session (its GCS and raylet name the temp dir;
    workers are the raylet's children): proxy, replica:<app>, or ray (controller, raylet, ...).
    Other users' Ray processes on a shared machine are left out."""
    commands, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except OSError:
                continue
    roots = {pid for pid, cmd in commands.items() if temp_dir.encode() in cmd}
    roles = {}
    for pid, cmd in commands.items():
        if pid in roots or parents.get(pid) in roots:
            text = cmd.decode(errors="replace")
            if "ProxyActor" in text:
                roles[pid] = "proxy"
            elif "ServeReplica:" in text:
                roles[pid] = "replica:" + text.split("ServeReplica:", 1)[1].split(":", 1)[0]
            else:
                roles[pid] = "ray"
    return roles


def cpu_seconds(roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far, summed per role; this process is "client"."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {"client": time.process_time()}
    for pid, role in roles.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def closed_loop(
    port: int, path: str, bodies: list[bytes], concurrency: int, requests: int, roles=None
) -> dict:
    """`concurrency` threads, each with one kept-alive connection, until `requests` answers;
    with `roles`, also the CPU milliseconds per answer each role spent."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        headers = {"Content-Type": "application/json"}
        while (i := next(counter)) < requests:
            body = bodies[i % len(bodies)]
            start = time.perf_counter()
            connection.request("POST", path + "/v1/chat/completions", body, headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - start
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                    batches.append(json.loads(payload)["adaptive"]["batch_size"])
                else:
                    errors.append(payload.decode()[:200])
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    before = cpu_seconds(roles or {})
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = cpu_seconds(roles or {})
    cpu = {
        f"cpu {k}": 1000 * (after[k] - before.get(k, 0.0)) / max(len(latencies), 1) for k in after
    }
    return {
        "throughput": len(latencies) / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "errors": len(errors),
        "batch": statistics.mean(batches) if batches else float("nan"),
        **cpu,
    }


def round_trips(port: int, requests: int) -> list[float]:
    """Seconds per `GET /health` at concurrency 1: the HTTP and Ray Serve path, no model."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        connection.request("GET", "/health")
        connection.getresponse().read()
        times.append(time.perf_counter() - start)
    connection.close()
    return times


def offline_batched(model, images, questions, scale, batch: int, max_tokens: int) -> float:
    """Samples per second of `AdaptiveLMM.generate` in batches of `batch`, in-process: the
    ceiling the server can reach with no HTTP, Ray or per-request work."""
    start = time.perf_counter()
    for i in range(0, len(questions), batch):
        chunk = slice(i, i + batch)
        model.generate(images[chunk], questions[chunk], scale=scale, max_new_tokens=max_tokens)
    return len(questions) / (time.perf_counter() - start)


def request_bodies(images, questions, scale, max_tokens: int) -> list[bytes]:
    bodies = []
    for image, question in zip(images, questions, strict=True):
        content = [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_uri(image)}},
        ]
        body = {
            "model": "adaptive-m3",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "scale": scale,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-m3")
    parser.add_argument("--router", default=None)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--images", type=int, default=64, help="test-split images (4 q each)")
    parser.add_argument("--min-requests", type=int, default=64, help="per level, at least 4xC")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=6, help="as the quickstart's labels")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from data.synthetic import make_split
    from m3core.shipped import resolve_model
    from pipelines.adaptive import AdaptiveLMM
    from pipelines.cli import quiet_libraries
    from pipelines.serve import ServeConfig, build_app, start

    quiet_libraries()
    router = find_router(args)
    rows = make_split("test", args.images, seed=1)
    images, questions = list(rows["image"]), list(rows["question"])
    threads = max(1, int(args.cpus_per_replica))
    torch.set_num_threads(threads)  # the replica's thread count, for a like-for-like reference
    model = AdaptiveLMM.from_pretrained(resolve_model(args.model), router, device="cpu")
    largest = model.scales[-1]
    fixed = f"fixed {largest}"
    routed = model.generate(images, questions, max_new_tokens=args.max_tokens)
    mean_tokens = statistics.mean(r.visual_tokens for r in routed)
    load = {
        "adaptive": request_bodies(images, questions, "auto", args.max_tokens),
        fixed: request_bodies(images, questions, largest, args.max_tokens),
    }

    # Two apps side by side, one replica each: batching on at /, off at /unbatched; only one
    # is under load at a time, and the rounds interleave everything so shared-machine load
    # drifts hit every configuration alike.
    temp_dir = tempfile.mkdtemp(prefix="adaptive-m3-bench-serve-")
    ray.init(
        num_cpus=max(2, 2 * threads),
        _temp_dir=temp_dir,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    port = free_port()
    common = dict(
        model=args.model,
        router=str(router),
        port=port,
        batch_wait_ms=args.batch_wait_ms,
        cpus_per_replica=args.cpus_per_replica,
        default_max_tokens=args.max_tokens,
    )
    runs: dict[tuple, list[dict]] = {}
    single: list[float] = []
    single_fixed: list[float] = []
    health: list[float] = []
    load_before = os.getloadavg()[0]
    inprocess: dict[str, list[float]] = {"adaptive": [], fixed: []}
    try:
        start(ServeConfig(max_batch_size=args.max_batch_size, **common))
        unbatched = build_app(ServeConfig(max_batch_size=1, **common))
        serve.run(unbatched, name="unbatched", route_prefix="/unbatched", blocking=False)
        paths = {"on": "", "off": "/unbatched"}
        roles = session_processes(temp_dir)
        for bodies in load.values():  # warm-up
            for path in paths.values():
                closed_loop(port, path, bodies, 4, 32)
        for _ in range(args.rounds):
            single += offline_single(model, images, questions, 32, args.max_tokens)
            single_fixed += offline_single(model, images, questions, 32, args.max_tokens, largest)
            health += round_trips(port, 64)
            for name, scale in (("adaptive", "auto"), (fixed, largest)):
                inprocess[name].append(
                    offline_batched(
                        model, images, questions, scale, args.max_batch_size, args.max_tokens
                    )
                )
            for c in levels:
                for name, bodies in load.items():
                    for batching, path in paths.items():
                        n = max(args.min_requests, 4 * c)
                        result = closed_loop(port, path, bodies, c, n, roles)
                        runs.setdefault((name, batching, c), []).append(result)
    finally:
        serve.shutdown()
        ray.shutdown()

    load_after = os.getloadavg()[0]
    results = {
        key: {m: statistics.median(r[m] for r in rounds) for m in rounds[0]}
        for key, rounds in runs.items()
    }
    print(
        f"model {args.model}, router {router}: {len(questions)} test questions, adaptive mean "
        f"{mean_tokens:.1f} visual tokens (largest scale {largest}); one replica per "
        f"configuration, {args.cpus_per_replica:g} CPU, batch <= {args.max_batch_size}, wait "
        f"{args.batch_wait_ms:g} ms; median of {args.rounds} interleaved rounds; machine load "
        f"average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs)"
    )
    base50, base95 = percentile(single, 50), percentile(single, 95)
    print(
        f"in-process AdaptiveLMM.generate, one sample per call: p50 {1000 * base50:.1f} ms, "
        f"p95 {1000 * base95:.1f} ms; batches of {args.max_batch_size}: adaptive "
        f"{statistics.median(inprocess['adaptive']):.1f}, {fixed} "
        f"{statistics.median(inprocess[fixed]):.1f} samples/s ({threads} torch thread(s): "
        f"{1000 / statistics.median(inprocess['adaptive']):.1f} and "
        f"{1000 / statistics.median(inprocess[fixed]):.1f} CPU ms per sample)"
    )
    apps = {"on": "replica:adaptive-m3", "off": "replica:unbatched"}
    print(
        f"GET /health at concurrency 1 (proxy and replica, no model): p50 "
        f"{1000 * percentile(health, 50):.1f} ms, p95 {1000 * percentile(health, 95):.1f} ms"
    )
    print(
        "batch: mean requests per server batch; CPU ms per answer: client (this process), "
        "proxy, the replica under load, the rest of Ray"
    )
    print(
        f"{'mode':>10} {'batching':>8} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'batch':>5} {'client':>7} {'proxy':>6} {'replica':>7} {'ray':>5} err"
    )
    for (name, batching, c), r in sorted(results.items(), key=lambda kv: kv[0][2]):
        replica = r.get(f"cpu {apps[batching]}", float("nan"))
        rest = sum(
            v for k, v in r.items() if k.startswith("cpu ray") or k.startswith("cpu replica")
        )
        print(
            f"{name:>10} {batching:>8} {c:>5} {r['throughput']:>8.1f} {1000 * r['p50']:>8.1f} "
            f"{1000 * r['p95']:>8.1f} {r['batch']:>5.1f} {r['cpu client']:>7.1f} "
            f"{r.get('cpu proxy', 0):>6.1f} {replica:>7.1f} {rest - replica:>5.1f} {r['errors']:g}"
        )
    batched = {name: statistics.median(v) for name, v in inprocess.items()}
    one_by_one = {"adaptive": 1 / statistics.mean(single), fixed: 1 / statistics.mean(single_fixed)}
    mode_batched = batched["adaptive"] / batched[fixed]
    mode_single = one_by_one["adaptive"] / one_by_one[fixed]
    print(
        f"in-process ceilings: adaptive / {fixed} samples/s {mode_batched:.2f}x in batches, "
        f"{mode_single:.2f}x one sample per call; batches / one per call "
        f"{batched['adaptive'] / one_by_one['adaptive']:.2f}x (adaptive), "
        f"{batched[fixed] / one_by_one[fixed]:.2f}x ({fixed})"
    )
    print("targets:")
    for c in levels:
        on = results[("adaptive", "on", c)]["throughput"] / results[(fixed, "on", c)]["throughput"]
        print(
            f"  adaptive / {fixed} throughput at concurrency {c} (batching on): {on:.2f}x "
            "(target >= 2x)"
        )
    if 32 in levels:
        for name in load:
            on = results[(name, "on", 32)]["throughput"]
            off = results[(name, "off", 32)]["throughput"]
            print(f"  batching on / off at concurrency 32 ({name}): {on / off:.2f}x (target >= 3x)")
    if 1 in levels:
        for batching in ("on", "off"):
            r = results[("adaptive", batching, 1)]
            print(
                f"  p95 at concurrency 1 (batching {batching}) / generate's single-sample p95: "
                f"{r['p95'] / base95:.2f}x (target <= 1.5x); p50 / p50: {r['p50'] / base50:.2f}x"
            )


if __name__ == "__main__":
    main()
