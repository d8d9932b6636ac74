"""hat.chatter 0.5.11 measured now, for a comparison with bench.py under equal conditions.

The method of shared/REFERENCE.md: the server in a child process, N = 20,000 per run, 5
runs; sequential round trips with ``send(last=False, timeout=5)`` + ``receive()``; one-way
sends with a ``drain()`` every 100 messages, the clock stopped by the reply to a final
end marker. Needs ``pip install hat-chatter==0.5.11`` (not a dependency of the package).
"""
import asyncio, statistics, subprocess, sys, time
from hat import chatter, sbs

repo = sbs.Repository(chatter.sbs_repo, r"module Bench Msg = Integer")
N = 20000
ADDR = "tcp+sbs://127.0.0.1:23456"


async def server():
    async def on_conn(conn):
        while True:
            try:
                msg = await conn.receive()
            except ConnectionError:
                return
            if not msg.last:
                conn.send(chatter.Data("Bench", "Msg", msg.data.data), conv=msg.conv)
    srv = await chatter.listen(repo, ADDR, on_conn)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await srv.async_close()


async def client():
    seq, one = [], []
    for _ in range(5):
        conn = await chatter.connect(repo, ADDR)
        t = time.perf_counter()
        for i in range(N):
            conn.send(chatter.Data("Bench", "Msg", i), last=False, timeout=5, timeout_cb=lambda c: None)
            await conn.receive()
        seq.append(N / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(N):
            conn.send(chatter.Data("Bench", "Msg", i))
            if i % 100 == 99:
                await conn.drain()
        conn.send(chatter.Data("Bench", "Msg", -1), last=False)
        await conn.receive()
        one.append(N / (time.perf_counter() - t))
        await conn.async_close()
    print(f"hat.chatter sequential round trips/s: median {statistics.median(seq):,.0f} ({', '.join(f'{v:,.0f}' for v in seq)})")
    print(f"hat.chatter one-way msgs/s: median {statistics.median(one):,.0f} ({', '.join(f'{v:,.0f}' for v in one)})")


if sys.argv[1:] == ["server"]:
    asyncio.run(server())
else:
    p = subprocess.Popen([sys.executable, __file__, "server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    try:
        asyncio.run(client())
    finally:
        p.stdin.close(); p.wait(10)
