"""How long ``distill.fingerprint`` takes to read a teacher the first time: seconds per GB of sha256.

A file of ``--size-mib`` random bytes (default 1024: 1 GiB) is written to a temporary folder
(``--dir``, default the system's), then ``distill.fingerprint.file_digest`` reads it ``--repeats``
times (default 3) with the memo off (``DISTILL_CACHE=off``: every call hashes), in two ways:

- ``page cache``: the file as just written, in memory: the hash's own speed (one CPU core);
- ``disk``: the file's pages dropped from the page cache before each read (``fsync``, then
  ``posix_fadvise(DONTNEED)``, no root needed): the hash behind the disk, as a first run sees it.
  Linux only; left out elsewhere.

Seconds per GB are per 10**9 bytes; the best run counts (a shared machine is noisy), the median is
shown too. A later fingerprint of an unchanged file reads the memo and costs nothing.

Run (from the repository root)::

    .venv/bin/python benchmarks/hash_speed.py

Writes ``benchmarks/results/hash_speed.json`` (``--output`` to change), with the machine
(``common.environment()``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment

from distill.fingerprint import file_digest

BLOCK = 8 << 20  # the file is written in blocks of this size; distill.outputs.file_sha256 reads 8 MiB blocks too


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        left = size
        while left:
            n = min(BLOCK, left)
            file.write(os.urandom(n))
            left -= n
        file.flush()
        os.fsync(file.fileno())


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(path: Path, repeats: int, cold: bool) -> list[float]:
    seconds = []
    for _ in range(repeats):
        if cold:
            drop_from_page_cache(path)
        start = time.perf_counter()
        file_digest(path)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where the temporary file goes (default: the system's temporary folder)")
    parser.add_argument("--output", type=Path, default=RESULTS / "hash_speed.json")
    args = parser.parse_args(argv)

    os.environ["DISTILL_CACHE"] = "off"  # every call reads the whole file
    size = args.size_mib << 20
    ways = {"page cache": False} | ({"disk": True} if hasattr(os, "posix_fadvise") else {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-hash-speed-", dir=args.dir) as folder:
        path = Path(folder) / "weights.bin"
        write_random(path, size)
        for way, cold in ways.items():
            seconds = measure(path, args.repeats, cold)
            best = min(seconds)
            rows.append(
                {
                    "read": way,
                    "seconds": [round(s, 4) for s in seconds],
                    "seconds_per_gb": round(best / (size / 1e9), 4),
                    "median_seconds_per_gb": round(statistics.median(seconds) / (size / 1e9), 4),
                    "gb_per_second": round(size / 1e9 / best, 3),
                }
            )

    print(f"sha256 of a {args.size_mib} MiB file, {args.repeats} reads each, memo off")
    print(f"{'read':<12} {'s/GB (best)':>12} {'s/GB (median)':>14} {'GB/s':>7}")
    for row in rows:
        print(
            f"{row['read']:<12} {row['seconds_per_gb']:>12.3f} {row['median_seconds_per_gb']:>14.3f} "
            f"{row['gb_per_second']:>7.2f}"
        )
    result = {
        "benchmark": "hash_speed",
        "file_bytes": size,
        "block_bytes": BLOCK,
        "repeats": args.repeats,
        "rows": rows,
        "environment": environment(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
