"""A bounded load test of a running gateway: N concurrent asyncio clients for a fixed time.

    python -m histoxplain_service.app.loadtest --target HOST:PORT --index NAME --clients 20 --duration 60 \\
        [--token-file F] [--root-certificates F] [--image PNG ...] [--pid PID] [--deadline S] [--json]

Each client has its own channel (the SDK's ``AsyncClient``, retries off, so every status is
counted as the gateway sent it) and, until the duration is up, picks an RPC by the mix -- 70%
Search (k=10), 20% SearchAndExplain (Grad-CAM, k=3), 10% DescribeIndex -- with the query images
taken in turn and every call under the deadline. Calls in flight when the time is up finish.

Reported: the calls of each status per RPC, requests per second, latency p50 / p95 / p99 per
RPC of the calls answered OK (a refusal such as RESOURCE_EXHAUSTED returns at once and would
flatter the percentiles), and with ``--pid`` the memory of that process (the gateway): VmHWM
from ``/proc/<pid>/status`` at the end (the kernel's peak resident size over the process's life)
and the largest VmRSS sampled during the run. The exit status is 1 when any call failed with a
status other than RESOURCE_EXHAUSTED (admission control refusing work is the gateway working).

Torch-free: it needs the SDK only (and, without ``--image``, scikit-image's IHC sample as the
query), so it runs from the gateway image or any machine with ``histoxplain_client``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoxplain_client import NO_RETRY, ApiError, AsyncClient
from histoxplain_model.errors import HistoxplainError

__all__ = ["DEFAULT_MIX", "LoadResult", "RpcStats", "format_result", "main", "run_load"]

SEARCH, SEARCH_AND_EXPLAIN, DESCRIBE_INDEX = "Search", "SearchAndExplain", "DescribeIndex"
#: Share of the calls each RPC gets.
DEFAULT_MIX: Mapping[str, float] = {SEARCH: 0.7, SEARCH_AND_EXPLAIN: 0.2, DESCRIBE_INDEX: 0.1}
#: Statuses that are not failures: answered, or refused by admission control (retry later).
ACCEPTED = frozenset({"OK", "RESOURCE_EXHAUSTED"})
RSS_SAMPLE_S = 0.2


@dataclass(frozen=True)
class RpcStats:
    """What one RPC got during a run.

    Attributes:
        rpc: the RPC's name.
        statuses: calls per status code name (``OK``, ``RESOURCE_EXHAUSTED``, ...).
        latency_ms: p50, p95 and p99 in milliseconds of the calls answered OK; ``None`` when
            none was.
    """

    rpc: str
    statuses: Mapping[str, int]
    latency_ms: Mapping[str, float] | None

    @property
    def calls(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get("OK", 0)


@dataclass(frozen=True)
class LoadResult:
    """A finished run.

    Attributes:
        clients: concurrent clients.
        duration_s: wall time from the first call to the last answer.
        rpcs: per RPC, in the order of the mix.
        peak_rss_bytes: VmHWM of the watched process at the end (``None``: no process watched).
        max_sampled_rss_bytes: the largest VmRSS sampled during the run (``None`` likewise).
    """

    clients: int
    duration_s: float
    rpcs: Mapping[str, RpcStats]
    peak_rss_bytes: int | None = None
    max_sampled_rss_bytes: int | None = None

    @property
    def requests(self) -> int:
        return sum(stats.calls for stats in self.rpcs.values())

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def statuses(self) -> Counter[str]:
        """Calls per status code over all RPCs."""
        return sum((Counter(stats.statuses) for stats in self.rpcs.values()), Counter())

    @property
    def failures(self) -> dict[str, int]:
        """Calls per status that is neither OK nor RESOURCE_EXHAUSTED."""
        return {code: count for code, count in self.statuses.items() if code not in ACCEPTED}

    def to_json(self) -> dict[str, object]:
        """The figures as plain JSON values."""
        return {
            "clients": self.clients,
            "duration_s": round(self.duration_s, 2),
            "requests": self.requests,
            "requests_per_s": round(self.requests_per_s, 2),
            "statuses": dict(self.statuses),
            "rpcs": {
                name: {"statuses": dict(stats.statuses), "latency_ms": stats.latency_ms}
                for name, stats in self.rpcs.items()
            },
            "peak_rss_bytes": self.peak_rss_bytes,
            "max_sampled_rss_bytes": self.max_sampled_rss_bytes,
        }


@dataclass
class _Tally:
    """Statuses and OK latencies as the clients record them (one event loop: no locking)."""

    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)

    def record(self, rpc: str, code: str, seconds: float) -> None:
        self.statuses.setdefault(rpc, Counter())[code] += 1
        if code == "OK":
            self.latencies_s.setdefault(rpc, []).append(seconds)

    def stats(self, rpc: str) -> RpcStats:
        latencies = self.latencies_s.get(rpc)
        percentiles = None
        if latencies:
            p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 95, 99])
            percentiles = {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1)}
        return RpcStats(rpc, dict(self.statuses.get(rpc, {})), percentiles)


def _memory_bytes(pid: int, field_name: str) -> int:
    """``VmHWM`` or ``VmRSS`` of process ``pid`` from ``/proc/<pid>/status`` (reported in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no {field_name} line (a kernel thread?)")


class _RssWatch:
    """The largest VmRSS of a process, sampled every ``RSS_SAMPLE_S`` while :meth:`run` runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.largest = _memory_bytes(pid, "VmRSS")

    async def run(self) -> None:
        while True:
            self.largest = max(self.largest, _memory_bytes(self.pid, "VmRSS"))
            await asyncio.sleep(RSS_SAMPLE_S)


@dataclass(frozen=True)
class _Plan:
    """What every client does (see :func:`run_load` for the fields)."""

    target: str
    index: str
    images: Sequence[bytes]
    mix: Mapping[str, float]
    deadline_s: float
    search_k: int
    explain_k: int
    token: str | None
    root_certificates: bytes | None
    seed: int


async def _client(plan: _Plan, number: int, stop_at: float, tally: _Tally) -> None:
    """One client: calls until ``stop_at`` (monotonic), recording each outcome in ``tally``."""
    rng = random.Random(plan.seed + number)  # each client its own sequence, reproducible
    async with AsyncClient(
        plan.target, timeout=plan.deadline_s, retry=NO_RETRY, token=plan.token,
        root_certificates=plan.root_certificates,
    ) as client:
        calls: dict[str, Callable[[bytes], Awaitable[object]]] = {
            SEARCH: lambda image: client.search(plan.index, image, k=plan.search_k),
            SEARCH_AND_EXPLAIN: lambda image: client.search_and_explain(
                plan.index, image, k=plan.explain_k, method="gradcam"
            ),
            DESCRIBE_INDEX: lambda _image: client.describe_index(plan.index),
        }
        rpcs, weights = list(plan.mix), list(plan.mix.values())
        turn = number
        while time.monotonic() < stop_at:
            rpc = rng.choices(rpcs, weights)[0]
            image = plan.images[turn % len(plan.images)]
            turn += 1
            started = time.perf_counter()
            try:
                await calls[rpc](image)
                code = "OK"
            except ApiError as error:
                code = error.code.name
            tally.record(rpc, code, time.perf_counter() - started)


async def _run(plan: _Plan, clients: int, duration_s: float, pid: int | None) -> LoadResult:
    tally = _Tally()
    watch = _RssWatch(pid) if pid is not None else None
    sampler = asyncio.create_task(watch.run()) if watch is not None else None
    started = time.monotonic()
    try:
        await asyncio.gather(*(_client(plan, number, started + duration_s, tally) for number in range(clients)))
    finally:
        if sampler is not None:
            sampler.cancel()
    return LoadResult(
        clients=clients,
        duration_s=time.monotonic() - started,
        rpcs={rpc: tally.stats(rpc) for rpc in plan.mix},
        peak_rss_bytes=_memory_bytes(watch.pid, "VmHWM") if watch is not None else None,
        max_sampled_rss_bytes=watch.largest if watch is not None else None,
    )


def run_load(
    target: str,
    index: str,
    images: Sequence[bytes],
    *,
    clients: int = 20,
    duration_s: float = 60.0,
    deadline_s: float = 30.0,
    mix: Mapping[str, float] = DEFAULT_MIX,
    search_k: int = 10,
    explain_k: int = 3,
    token: str | None = None,
    root_certificates: bytes | None = None,
    pid: int | None = None,
    seed: int = 0,
) -> LoadResult:
    """Run ``clients`` concurrent clients against ``target`` for ``duration_s`` seconds.

    Blocking (it runs its own event loop); call it from a thread without a running loop.

    Args:
        index: the index every call uses (it must exist).
        images: encoded query images (PNG, JPEG or TIFF), used in turn.
        deadline_s: deadline of each call.
        mix: RPC name (``Search``, ``SearchAndExplain``, ``DescribeIndex``) -> share of calls.
        search_k / explain_k: k of Search and of SearchAndExplain (Grad-CAM, both sides).
        token / root_certificates: bearer token and PEM CA bundle (TLS) for the gateway.
        pid: a process whose memory to report (the gateway's).
        seed: the clients' RPC choices derive from it.

    Raises:
        ValueError: no images, fewer than one client, a non-positive duration or deadline, or
            an RPC the mix cannot call.
        FileNotFoundError: ``pid`` is no running process.
    """
    if not images:
        raise ValueError("give at least one query image")
    if clients < 1 or duration_s <= 0 or deadline_s <= 0:
        raise ValueError(f"clients must be >= 1 and durations > 0, got {clients}, {duration_s}, {deadline_s}")
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"the load test cannot call {sorted(unknown)}; use {sorted(DEFAULT_MIX)}")
    plan = _Plan(target, index, images, mix, deadline_s, search_k, explain_k, token, root_certificates, seed)
    return asyncio.run(_run(plan, clients, duration_s, pid))


def format_result(result: LoadResult, pid: int | None) -> str:
    """The short table ``main`` prints."""
    lines = [
        f"{result.clients} clients, {result.duration_s:.1f} s: {result.requests} requests, "
        f"{result.requests_per_s:.2f}/s; statuses {dict(result.statuses)}",
        f"{'rpc':<18}{'calls':>7}{'ok':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  other statuses",
    ]
    for stats in result.rpcs.values():
        latency = stats.latency_ms or {}
        cells = "".join(f"{latency[p]:>10.1f}" if p in latency else f"{'-':>10}" for p in ("p50", "p95", "p99"))
        others = {code: count for code, count in stats.statuses.items() if code != "OK"}
        lines.append(f"{stats.rpc:<18}{stats.calls:>7}{stats.ok:>7}{cells}  {others or ''}")
    if result.peak_rss_bytes is not None and result.max_sampled_rss_bytes is not None:
        lines.append(
            f"pid {pid}: peak RSS (VmHWM) {result.peak_rss_bytes / 2**20:,.0f} MiB, "
            f"largest RSS sampled during the run {result.max_sampled_rss_bytes / 2**20:,.0f} MiB"
        )
    return "\n".join(lines)


def _default_images() -> list[bytes]:
    """scikit-image's IHC sample (real histology), when no ``--image`` is given."""
    from histoxplain_service.app.samples import ihc_image_path

    return [ihc_image_path().read_bytes()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="histoxplain-loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="gateway HOST:PORT")
    parser.add_argument("--index", required=True, help="index every call uses")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default %(default)s)")
    parser.add_argument("--deadline", type=float, default=30.0, help="deadline of each call, s (default %(default)s)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--root-certificates", type=Path, help="PEM CA bundle of the gateway (turns TLS on)")
    parser.add_argument("--image", type=Path, nargs="+", help="query images (default: scikit-image's IHC sample)")
    parser.add_argument("--pid", type=int, help="report the memory of this process (the gateway)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' RPC choices")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    try:
        images = [path.read_bytes() for path in args.image] if args.image else _default_images()
        token = args.token_file.read_text().strip() if args.token_file else None
        roots = args.root_certificates.read_bytes() if args.root_certificates else None
        result = run_load(
            args.target, args.index, images, clients=args.clients, duration_s=args.duration,
            deadline_s=args.deadline, token=token, root_certificates=roots, pid=args.pid, seed=args.seed,
        )
    except (OSError, ValueError, HistoxplainError) as error:  # a file, an argument, no sample image
        print(f"histoxplain-loadtest: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else format_result(result, args.pid))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
