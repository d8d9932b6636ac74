"""Fixtures: the Rust test peer (examples/py_peer.rs), started once per session.

The peer binary is `$CHATTER_PY_PEER` if set (CI builds it once and sets it); otherwise it
is built here with `cargo build -p examples --example py_peer` (honouring
`CARGO_TARGET_DIR`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

#: Every test body runs under this bound: a bug fails the test instead of hanging it.
TEST_TIMEOUT = 20.0


def peer_binary() -> str:
    env = os.environ.get("CHATTER_PY_PEER")
    if env:
        return env
    subprocess.run(
        ["cargo", "build", "-q", "-p", "examples", "--example", "py_peer"], cwd=REPO, check=True
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "examples" / "py_peer")


class RustPeer:
    """A running py_peer process and the addresses it printed."""

    def __init__(self, binary: str) -> None:
        self.process = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.addresses: Dict[str, str] = {}
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if line == "ready":
                break
            if " " in line:
                name, address = line.split(" ", 1)
                self.addresses[name] = address
        else:
            raise RuntimeError(f"py_peer exited before it was ready (status {self.process.wait()})")

    def __getitem__(self, name: str) -> str:
        return self.addresses[name]

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def binary() -> str:
    return peer_binary()


@pytest.fixture(scope="session")
def rust(binary: str) -> Iterator[RustPeer]:
    peer = RustPeer(binary)
    yield peer
    peer.stop()


def run(body: Callable[[], Awaitable[T]], timeout: float = TEST_TIMEOUT) -> T:
    """Runs an async test body in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


def within(aw: Awaitable[T], seconds: float = 10.0) -> Awaitable[T]:
    """Bounds one await."""
    return asyncio.wait_for(aw, seconds)
