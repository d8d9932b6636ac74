"""Calls and signals per second from Python to a Rust chatter server.

Starts the Rust peer of the tests (examples/py_peer.rs, release build:
``cargo build --release -p examples --example py_peer``) unless ``--server ADDRESS``
is given, then measures over one TCP connection on this machine:

- sequential calls: ``await bench.add(i, 1)``, one at a time (a round trip each);
- pipelined calls: batches of ``--batch`` calls in flight, awaited together;
- one-way signals: ``await peer.signal("bench", "count", 1)``; the clock stops when the
  Rust side confirms it handled them all (a final round trip).

Each figure is the median of ``--runs`` runs, printed beside the Python baselines
measured on this machine (shared/REFERENCE.md): hat.chatter 12,949 sequential round
trips/s and 59,412 one-way msgs/s (its best setups), snakeMQ 2,109 RPC calls/s.

    python bench.py [--peer PATH] [--server ADDRESS] [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Awaitable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chatter  # noqa: E402

REFERENCE = {
    "sequential calls/s": ("hat.chatter 12,949 round trips/s; snakeMQ 2,109 RPC/s", 12949),
    "pipelined calls/s": ("hat.chatter 12,949 round trips/s (sequential only); snakeMQ 2,109 RPC/s", 12949),
    "one-way signals/s": ("hat.chatter 59,412 one-way msgs/s", 59412),
}


async def sequential(peer: chatter.Peer, n: int) -> float:
    bench = peer.remote("bench")
    t = time.perf_counter()
    for i in range(n):
        assert await bench.add(i, 1) == i + 1
    return n / (time.perf_counter() - t)


async def pipelined(peer: chatter.Peer, n: int, batch: int) -> float:
    bench = peer.remote("bench")
    t = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        results = await asyncio.gather(*[bench.add(i, 1) for i in range(k)])
        assert results[-1] == k
        done += k
    return n / (time.perf_counter() - t)


async def signals(peer: chatter.Peer, n: int) -> float:
    bench = peer.remote("bench", deadline=60)
    start_count = await bench.counted()
    t = time.perf_counter()
    signal = peer.signal
    for _ in range(n):
        await signal("bench", "count", 1)
    got = await bench.wait_counted(start_count + n, 60_000)
    elapsed = time.perf_counter() - t
    assert got == start_count + n, (got, start_count + n)
    return n / elapsed


async def measure(address: str, runs: int, n_seq: int, n_pipe: int, n_sig: int, batch: int) -> dict:
    results: dict = {"sequential calls/s": [], "pipelined calls/s": [], "one-way signals/s": []}
    for _ in range(runs):
        # A fresh connection per run and workload, so that no run inherits another's state.
        async with await chatter.Peer.connect(address) as peer:
            await sequential(peer, 200)  # warm-up
            results["sequential calls/s"].append(await sequential(peer, n_seq))
        async with await chatter.Peer.connect(address) as peer:
            await pipelined(peer, 2 * batch, batch)
            results["pipelined calls/s"].append(await pipelined(peer, n_pipe, batch))
        async with await chatter.Peer.connect(address) as peer:
            results["one-way signals/s"].append(await signals(peer, n_sig))
    return results


def start_peer(path: str) -> "tuple[subprocess.Popen, str]":
    proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    address = None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("main "):
            address = line.split(" ", 1)[1]
        if line == "ready":
            break
    if address is None:
        raise SystemExit(f"{path} did not print its address")
    return proc, address


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", default=str(target / "release" / "examples" / "py_peer"))
    parser.add_argument("--server", help="a running server with the `bench` object (py_peer)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small counts, one run (a smoke test)")
    args = parser.parse_args()
    n_seq, n_pipe, n_sig = (20_000, 100_000, 200_000) if not args.quick else (1_000, 5_000, 10_000)
    runs = 1 if args.quick else args.runs

    proc: Optional[subprocess.Popen] = None
    address = args.server
    if address is None:
        proc, address = start_peer(args.peer)
    try:
        results = asyncio.run(measure(address, runs, n_seq, n_pipe, n_sig, args.batch))
    finally:
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)

    print(f"Python {sys.version.split()[0]}, asyncio, {runs} run(s); server {address}")
    print(f"{'workload':<22} {'median':>10}  {'runs':<40} reference")
    for name, values in results.items():
        median = statistics.median(values)
        ref_text, ref = REFERENCE[name]
        runs_text = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<22} {median:>10,.0f}  {runs_text:<40} {ref_text} ({median / ref:.2f}x)")


if __name__ == "__main__":
    main()
