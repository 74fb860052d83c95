"""Pass-through benchmark: MeterUsage through the gateway against a direct boto3 loop.

Both paths call the same local AWS backend, started once in its own process, so
the only difference between them is the gateway hop (gRPC in, validation, the
access log, boto3 out). The gateway also runs in its own process, configured as
in production (``serve`` with the default credential chain and an endpoint from
``AWS_ENDPOINT_URL_MARKETPLACE_METERING``, not ``--local``), so neither server
shares the GIL of the measuring client.

Each run sends a fixed number of calls (bounded by a time limit) from N threads,
through one shared boto3 client (as the gateway does) or one shared gRPC channel.
Every call is a distinct record that must succeed: the usage dimension is unique
per call, so the backend's one-record-per-hour rule never answers
DuplicateRequest. Direct calls carry a fresh ClientToken as the gateway adds one,
so the backend does the same work for both.

On a small, noisy machine one pass proves little, so after a warm-up the runs
alternate direct/gateway for each concurrency, ``--rounds`` times; throughput is
the median over rounds and latency percentiles come from all rounds' samples.

Prints a table, PASS/MISS against the targets of the design (gateway throughput
at concurrency 16 at least 0.8 of direct; p50 latency added at concurrency 1 under
1 ms) and, last, one JSON line. Exits non-zero only if a call failed.

``--with-metrics`` measures what Prometheus metrics cost: a second gateway process,
the same but with ``--metrics-listen``, is a third mode ("gateway+metrics") in the
same rounds, reported as a ratio to the plain gateway. At the end one scrape of its
/metrics must count every MeterUsage call that gateway answered OK (warm-up
included), or the run fails: metrics that recorded nothing would cost nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.aws.backend import make_client
from gateway.config import Settings
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PRODUCT = "bench-product"
REGION = "us-east-1"
CREDS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
CONCURRENCIES = (1, 16)
MODES = ("direct", "gateway")
METRICS_MODE = "gateway+metrics"  # --with-metrics: a gateway serving /metrics too
CALL_TIMEOUT = 10.0  # seconds; a caller's deadline, as a real service would set
THROUGHPUT_RATIO_TARGET = 0.8  # gateway/direct at concurrency 16
ADDED_P50_TARGET_MS = 1.0  # at concurrency 1

Call = Callable[[str], None]  # one MeterUsage for a usage dimension; raises on failure


# --- servers in their own processes -------------------------------------------------


def _wait_for_line(log: Path, proc: subprocess.Popen[bytes], event: str, timeout: float) -> dict[str, Any]:
    """The first JSON log line with ``"event": event`` a child writes to ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                return entry
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode} before logging {event!r}:\n{log.read_text()}"
            )
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not log {event!r} within {timeout}s:\n{log.read_text()}")


@contextmanager
def child(
    args: Sequence[str], event: str, workdir: Path, env: dict[str, str] | None = None, name: str | None = None
) -> Iterator[dict[str, Any]]:
    """Run ``python -m gateway ARGS`` with stdout to a file; yield its ``event`` log line.

    Logs go to a file (``name``.log, by default the command's), not a pipe, so the
    measuring process spends nothing draining the gateway's per-RPC access log.
    """
    log = workdir / f"{name or args[0]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ if env is None else env,
        )
    try:
        yield _wait_for_line(log, proc, event, timeout=30)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_serving(target: str, timeout: float = 10.0) -> None:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"gateway at {target} is {reply.status}, not SERVING")


# --- the two ways to call -----------------------------------------------------------


def direct_call(endpoint_url: str) -> Call:
    """MeterUsage with the gateway's own client set-up, from this process."""
    session = boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)
    client = make_client(Settings(), endpoint_url=endpoint_url, session=session)

    def call(dimension: str) -> None:
        client.meter_usage(
            ProductCode=PRODUCT,
            Timestamp=datetime.now(UTC),
            UsageDimension=dimension,
            UsageQuantity=1,
            ClientToken=str(uuid.uuid4()),
        )

    return call


def gateway_call(channels: Sequence[grpc.Channel]) -> Call:
    """MeterUsage through the gateway; each calling thread keeps one of ``channels``.

    One channel is one HTTP/2 connection, as one boto3 pool slot is one HTTP
    connection: like the direct loop's pool, the callers hold several connections,
    which is also what lets ``serve --processes N`` spread them over its workers.
    """
    stubs = [pb_grpc.MeteringServiceStub(ch) for ch in channels]
    turn = itertools.count()
    mine = threading.local()

    def call(dimension: str) -> None:
        stub = getattr(mine, "stub", None)
        if stub is None:
            stub = mine.stub = stubs[next(turn) % len(stubs)]
        request = pb.MeterUsageRequest(product_code=PRODUCT, usage_dimension=dimension, usage_quantity=1)
        request.timestamp.GetCurrentTime()
        reply = stub.MeterUsage(request, timeout=CALL_TIMEOUT)
        if not reply.metering_record_id:
            raise RuntimeError(f"no metering record id for {dimension}")

    return call


def scraped_ok_meter_usage(address: str) -> float:
    """``grpc_server_handled_total{grpc_code="OK",grpc_method="MeterUsage"}`` from one scrape."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == "MeterUsage"
        and sample.labels.get("grpc_code") == "OK"
    )


# --- measuring ----------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    concurrency: int
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls only
    failures: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def measure(mode: str, call: Call, concurrency: int, calls: int, max_seconds: float, ids: Iterator[int]) -> Run:
    """``calls`` calls from ``concurrency`` threads, stopping early at ``max_seconds``."""
    run = Run(mode, concurrency)
    budget = itertools.count()  # next() on a C iterator is atomic under the GIL
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + max_seconds

    def worker() -> None:
        mine: list[float] = []
        failed: list[str] = []
        while next(budget) < calls and time.perf_counter() < stop_at:
            dimension = f"dim-{next(ids)}"
            began = time.perf_counter()
            try:
                call(dimension)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports failures, it does not die of them
                failed.append(f"{type(exc).__name__}: {exc}"[:300])
            else:
                mine.append(time.perf_counter() - began)
        with lock:
            run.latencies.extend(mine)
            run.failures.extend(failed)

    threads = [threading.Thread(target=worker, name=f"{mode}-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.elapsed = time.perf_counter() - start
    return run


def percentile(samples: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (1-99), interpolated between samples."""
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def summarise(runs: Sequence[Run], modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Figures per mode and concurrency, the ratios and the added latency."""
    out: dict[str, Any] = {}
    for mode in modes:
        for c in CONCURRENCIES:
            mine = [r for r in runs if r.mode == mode and r.concurrency == c]
            pooled = [x for r in mine for x in r.latencies]
            out[f"{mode}_c{c}"] = {
                "throughput": round(statistics.median(r.throughput for r in mine), 1),
                "throughput_rounds": [round(r.throughput, 1) for r in mine],
                "p50_ms": round(percentile(pooled, 50) * 1000, 3),
                "p99_ms": round(percentile(pooled, 99) * 1000, 3),
                "calls": len(pooled),
            }
    for c in CONCURRENCIES:
        d, g = out[f"direct_c{c}"], out[f"gateway_c{c}"]
        out[f"ratio_c{c}"] = round(g["throughput"] / d["throughput"], 3) if d["throughput"] else 0.0
        out[f"added_p50_ms_c{c}"] = round(g["p50_ms"] - d["p50_ms"], 3)
        out[f"added_p99_ms_c{c}"] = round(g["p99_ms"] - d["p99_ms"], 3)
        if METRICS_MODE in modes:  # what metrics cost: gateway+metrics against the plain gateway
            m = out[f"{METRICS_MODE}_c{c}"]
            out[f"metrics_ratio_c{c}"] = round(m["throughput"] / g["throughput"], 3) if g["throughput"] else 0.0
            out[f"metrics_added_p50_ms_c{c}"] = round(m["p50_ms"] - g["p50_ms"], 3)
            out[f"metrics_added_p99_ms_c{c}"] = round(m["p99_ms"] - g["p99_ms"], 3)
    out["targets"] = {
        "ratio_c16_at_least_0.8": "PASS" if out["ratio_c16"] >= THROUGHPUT_RATIO_TARGET else "MISS",
        "added_p50_ms_c1_under_1": "PASS" if out["added_p50_ms_c1"] < ADDED_P50_TARGET_MS else "MISS",
    }
    return out


def table(summary: dict[str, Any], modes: Sequence[str] = MODES) -> str:
    w = max(8, *map(len, modes))
    rows = [f"{'':>4} {'':{w}} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for c in CONCURRENCIES:
        for mode in modes:
            s = summary[f"{mode}_c{c}"]
            rows.append(f"c={c:<2} {mode:{w}} {s['throughput']:9.1f} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f}")
        rows.append(
            f"c={c:<2} {'added':{w}} {'x' + format(summary[f'ratio_c{c}'], '.3f'):>9} "
            f"{summary[f'added_p50_ms_c{c}']:+8.3f} {summary[f'added_p99_ms_c{c}']:+8.3f}"
        )
        if METRICS_MODE in modes:
            rows.append(
                f"c={c:<2} {'metrics':{w}} {'x' + format(summary[f'metrics_ratio_c{c}'], '.3f'):>9} "
                f"{summary[f'metrics_added_p50_ms_c{c}']:+8.3f} {summary[f'metrics_added_p99_ms_c{c}']:+8.3f}"
                f"  ({METRICS_MODE} against gateway)"
            )
    t = summary["targets"]
    rows.append(
        f"target gateway/direct throughput at c=16 >= {THROUGHPUT_RATIO_TARGET}: "
        f"{summary['ratio_c16']:.3f} {t['ratio_c16_at_least_0.8']}"
    )
    rows.append(
        f"target p50 added latency at c=1 < {ADDED_P50_TARGET_MS} ms: "
        f"{summary['added_p50_ms_c1']:+.3f} ms {t['added_p50_ms_c1_under_1']}"
    )
    return "\n".join(rows)


def benchmark(
    calls: int, rounds: int, warmup: int, max_seconds: float, processes: int = 1, with_metrics: bool = False
) -> tuple[dict[str, Any], list[Run]]:
    ids = itertools.count()
    runs: list[Run] = []
    modes = (*MODES, METRICS_MODE) if with_metrics else MODES
    answered: dict[str, int] = dict.fromkeys(modes, 0)  # successful calls per mode, warm-up included
    with tempfile.TemporaryDirectory(prefix="passthrough-") as tmp:
        workdir = Path(tmp)
        with child(["local-aws", "--port", "0"], "local_aws_started", workdir) as started:
            endpoint = str(started["endpoint"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no stray profile or token
            # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is what other SDKs (and the docs) use
            env.update(
                CREDS, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL_MARKETPLACE_METERING=endpoint
            )
            serve = ["serve", "--listen", "127.0.0.1:0", "--processes", str(processes)]
            with contextlib.ExitStack() as stack:
                paths: dict[str, Call] = {"direct": direct_call(endpoint)}
                serving: dict[str, dict[str, Any]] = {}
                for mode in modes[1:]:
                    extra = ["--metrics-listen", "127.0.0.1:0"] if mode == METRICS_MODE else []
                    serving[mode] = stack.enter_context(child([*serve, *extra], "serving", workdir, env, name=mode))
                    target = str(serving[mode]["listen"])
                    wait_serving(target)
                    # one connection per concurrent caller, as the direct loop's pool has
                    channels = [
                        stack.enter_context(
                            grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                        )
                        for _ in range(max(CONCURRENCIES))
                    ]
                    paths[mode] = gateway_call(channels)
                for mode in modes:  # connections, caches, lazy imports: not measured
                    answered[mode] += len(
                        measure(mode, paths[mode], max(CONCURRENCIES), warmup, max_seconds, ids).latencies
                    )
                for i in range(rounds):
                    for c in CONCURRENCIES:
                        # rotate which path goes first, so none always gets the cooler machine
                        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                            run = measure(mode, paths[mode], c, calls, max_seconds, ids)
                            print(
                                f"  round {i + 1} c={c:<2} {mode:{max(8, *map(len, modes))}} "
                                f"{run.throughput:8.1f} calls/s"
                                f"{f'  {len(run.failures)} FAILED' if run.failures else ''}",
                                file=sys.stderr,
                            )
                            runs.append(run)
                            answered[mode] += len(run.latencies)
                summary = summarise(runs, modes)
                if with_metrics:  # the metrics were recorded: one scrape counts every call answered OK
                    scraped = scraped_ok_meter_usage(str(serving[METRICS_MODE]["metrics"]))
                    summary["metrics_check"] = {"answered_ok": answered[METRICS_MODE], "scraped_handled_ok": scraped}
                    if scraped != answered[METRICS_MODE]:
                        raise RuntimeError(
                            f"{METRICS_MODE}: /metrics counts {scraped:g} MeterUsage calls handled OK, "
                            f"but {answered[METRICS_MODE]} were answered"
                        )
    return summary, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measured run [default 2000]")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/gateway rounds [default 3]")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per path first [default 200]")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time limit of one run [default 30]")
    parser.add_argument(
        "--processes", type=int, default=1, help="gateway server processes (serve --processes) [default 1]"
    )
    parser.add_argument(
        "--with-metrics",
        action="store_true",
        help=f"a third mode, {METRICS_MODE!r}: a gateway with --metrics-listen, against the plain gateway",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 calls, 1 round, 16 warm-up calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.warmup = 20, 1, 16
    print(
        f"pass-through: gateway with {args.processes} "
        f"process(es){' and with metrics' if args.with_metrics else ''}, {args.calls} calls per run, "
        f"{args.rounds} rounds, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}, boto3 {boto3.__version__}",
        file=sys.stderr,
    )
    summary, runs = benchmark(args.calls, args.rounds, args.warmup, args.max_seconds, args.processes, args.with_metrics)
    failures = [f for r in runs for f in r.failures]
    summary["failures"] = len(failures)
    summary["config"] = {
        "calls": args.calls,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "processes": args.processes,
        "with_metrics": args.with_metrics,
    }
    print(table(summary, (*MODES, METRICS_MODE) if args.with_metrics else MODES))
    for failure in failures[:5]:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(json.dumps({"benchmark": "passthrough", **summary}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
