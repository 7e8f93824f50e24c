"""Checkpoints in object storage: ckptavg reading over the URL vs downloading first vs a plain read.

``serve`` starts a local S3-compatible server (moto's, on 127.0.0.1) and uploads N float32
safetensors inputs of M MiB each (the figures in benchmarks/README.md use s3rver holding the same
objects: moto reads a whole object for every range request); then time, with any timer that runs
whole commands several times (``/usr/bin/time -v`` in a loop, hyperfine):

  (a) ckptavg over the URL:      ckptavg merge 's3://bench/in/*.safetensors' -o OUT.safetensors -q
  (b) download, then merge:      python benchmarks/urls_bench.py download-merge   (s3fs's own ``get``)
  (c) a plain sequential read:   python benchmarks/urls_bench.py read-seq          (fsspec, 8 MiB reads)

Usage::

    python benchmarks/urls_bench.py serve --n 8 --mib 64 &      # prints the environment to export
    export AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
    ckptavg merge 's3://bench/in/*.safetensors' -o /tmp/a.safetensors -q
    python benchmarks/urls_bench.py download-merge
    python benchmarks/urls_bench.py read-seq

A store whose connections are bandwidth-limited, as real object stores are (the loopback of one
machine is not): ``throttle`` is a TCP proxy limiting each connection to ``--mb-per-s``; point
``AWS_ENDPOINT_URL`` at it instead of the server::

    python benchmarks/urls_bench.py throttle --listen 4570 --target 127.0.0.1:4569 --mb-per-s 8 &

``read-seq`` and ``download-merge`` print their own timings (seconds spent reading / downloading) on
stdout; ckptavg's ``--json`` report has its own ``seconds``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

BUCKET = "bench"


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def serve(n: int, mib: int) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import torch
    from safetensors.torch import save_file

    from tests._s3_server import CREDENTIALS, MotoServer

    server = MotoServer()
    os.environ.update(CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    fs = _fs()
    fs.mkdir(BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        per = mib * 2**20 // 4 // 8
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            sd = {f"layer{k}.weight": torch.randn(per, generator=g) for k in range(8)}
            path = os.path.join(tmp, f"step-{(i + 1) * 1000}.safetensors")
            save_file(sd, path)
            fs.put_file(path, f"{BUCKET}/in/step-{(i + 1) * 1000}.safetensors")
            os.unlink(path)
    print(f"export AWS_ENDPOINT_URL={server.endpoint} " + " ".join(f"{k}={v}" for k, v in CREDENTIALS.items()),
          flush=True)
    try:
        while server.proc.poll() is None:
            time.sleep(1)
    finally:
        server.stop()


def download_merge(out: str) -> None:
    fs = _fs()
    tmp = tempfile.mkdtemp(prefix="bench-dl-")
    try:
        t0 = time.perf_counter()
        fs.get(f"{BUCKET}/in/", tmp + "/", recursive=True)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ckptavg", "merge", tmp, "-o", out, "-q"], check=True)
        print(f"download {t1 - t0:.3f} s, merge {time.perf_counter() - t1:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_seq() -> None:
    fs = _fs()
    t0 = time.perf_counter()
    total = 0
    for key in sorted(fs.find(f"{BUCKET}/in/")):
        with fs.open(key, "rb", block_size=8 << 20) as fh:
            while chunk := fh.read(8 << 20):
                total += len(chunk)
    dt = time.perf_counter() - t0
    print(f"read {total / 2**20:.0f} MiB in {dt:.3f} s ({total / 2**20 / dt:.0f} MiB/s)")


def throttle(listen: int, target: str, mb_per_s: float, burst_kib: int) -> None:
    """A TCP proxy on 127.0.0.1:``listen`` in front of ``target`` (HOST:PORT) that limits every
    connection's download to ``mb_per_s`` (a token bucket of ``burst_kib``): the per-connection
    throughput limit of a real object store (S3 serves about 50-100 MB/s per connection; its
    guidance is parallel range requests), on a machine whose loopback has no such limit."""
    import asyncio

    host, port = target.rsplit(":", 1)
    rate = mb_per_s * 1e6
    burst = burst_kib * 1024

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limited: bool) -> None:
        tokens, last = float(burst), time.monotonic()
        try:
            while data := await reader.read(64 << 10):
                writer.write(data)
                await writer.drain()
                if limited:
                    now = time.monotonic()
                    tokens = min(float(burst), tokens + (now - last) * rate) - len(data)
                    last = now
                    if tokens < 0:
                        await asyncio.sleep(-tokens / rate)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    live = [0, 0]  # connections open now, the most at once (printed when it grows)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        live[0] += 1
        if live[0] > live[1]:
            live[1] = live[0]
            print(f"throttle: {live[1]} connections at once", file=sys.stderr, flush=True)
        try:
            await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))
        finally:
            live[0] -= 1

    async def run() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        print(f"export AWS_ENDPOINT_URL=http://127.0.0.1:{listen}  # {mb_per_s:g} MB/s per connection", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--mib", type=int, default=64)
    d = sub.add_parser("download-merge")
    d.add_argument("-o", default="/tmp/bench-download-merge.safetensors")
    sub.add_parser("read-seq")
    t = sub.add_parser("throttle", help="a per-connection bandwidth limit in front of the server")
    t.add_argument("--listen", type=int, required=True)
    t.add_argument("--target", required=True, help="HOST:PORT of the S3 server")
    t.add_argument("--mb-per-s", type=float, default=8.0)
    t.add_argument("--burst-kib", type=int, default=256)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.n, a.mib)
    elif a.cmd == "throttle":
        throttle(a.listen, a.target, a.mb_per_s, a.burst_kib)
    elif a.cmd == "download-merge":
        download_merge(a.o)
    else:
        read_seq()


if __name__ == "__main__":
    main()
