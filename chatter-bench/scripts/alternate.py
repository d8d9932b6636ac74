#!/usr/bin/env python3
"""Alternates chatter-bench child measurements, so that builds or variants measured in one
session see the same machine noise (BENCHMARKS.md, "How it measures").

Each variant is `LABEL=BIN,WORKLOAD,SYSTEM[,ENV=VALUE...]`. Every iteration runs each
variant once, in an order rotated by one per iteration, as
`BIN --child WORKLOAD SYSTEM LAYOUT --total TOTAL` with the variant's environment. Prints
each variant's median headline figure (the RESULT line's first field: operations or
connections per second) and the median of its per-iteration ratio to the first variant.

    python3 chatter-bench/scripts/alternate.py onecore 12 8000 \\
        raw=target/release/chatter-bench,connect,raw \\
        raw_timer=target/release/chatter-bench,connect,raw,CHATTER_BENCH_PENDING_TIMER=1 \\
        rpc=target/release/chatter-bench,connect,chatter-rpc
"""

import os
import statistics
import subprocess
import sys


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    layout, iterations, total = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    variants = []
    for spec in sys.argv[4:]:
        label, _, rest = spec.partition("=")
        binary, workload, system, *envs = rest.split(",")
        env = dict(os.environ)
        for e in envs:
            key, _, value = e.partition("=")
            env[key] = value
        variants.append((label, [binary, "--child", workload, system, layout, "--total", total], env))
    figures = {label: [] for label, _, _ in variants}
    for i in range(iterations):
        k = i % len(variants)
        for label, argv, env in variants[k:] + variants[:k]:
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
            line = next(l for l in out.splitlines() if l.startswith("RESULT "))
            figures[label].append(float(line.split()[1]))
        print(i, {label: round(f[-1]) for label, f in figures.items()}, flush=True)
    first = variants[0][0]
    for label, f in figures.items():
        ratio = statistics.median(x / y for x, y in zip(f, figures[first]))
        print(f"{label:16} median {statistics.median(f):12.0f}/s   {ratio:.3f}x {first}")


if __name__ == "__main__":
    main()
