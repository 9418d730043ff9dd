"""Decode speed of ordinary values, and time and memory of every hostile input.

    python bench/codec_decode.py                 # both tables
    python bench/codec_decode.py --normal        # ordinary values only
    python bench/codec_decode.py --hostile [--stack-kb 256] [--timeout 60] [FILE ...]

Ordinary values: best of several ``timeit`` runs per decode, in CPU time.  Hostile
inputs (by default every file in ``tests/fuzz/corpus/``): each decoded in a fresh
process (so a crash or a hang costs only that row), in a thread with a stack of
``--stack-kb`` KiB; the row shows the outcome, the time of the decode (the best of
the first decode's wall time and three more decodes' CPU time), the peak of memory
traced by ``tracemalloc`` during another decode, and the process's peak RSS.  The
goal: any input of at most 1 MB decodes or fails with a CodecError within 100 ms
and 64 MB.  Run it against another checkout with ``PYTHONPATH=<checkout>/src``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
import timeit
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "corpus"

_ONE = textwrap.dedent(
    """
    import json, resource, sys, threading, time, tracemalloc
    from pygirder import codec
    from pygirder.errors import CodecError
    import numpy  # imported up front: its import is not the decoder's cost
    data = open(sys.argv[1], "rb").read()
    result = {}

    def once():
        try:
            codec.decode(data)
            return "value"
        except CodecError as exc:
            return "CodecError: " + str(exc).replace("cannot decode value: ", "")

    def run():
        started = time.perf_counter()
        result["outcome"] = once()
        result["seconds"] = time.perf_counter() - started
        if result["seconds"] < 1:  # best of three, in CPU time: the machine is shared
            for _ in range(3):
                started = time.process_time()
                once()
                result["seconds"] = min(result["seconds"], time.process_time() - started)
        tracemalloc.start()  # a second decode: tracing slows the first one down
        once()
        result["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    threading.stack_size(int(sys.argv[2]) * 1024)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    """
)


def hostile(files: list[Path], stack_kb: int, timeout: float) -> None:
    print(f"{'input':42} {'bytes':>9} {'ms':>9} {'peak MiB':>9} {'RSS MiB':>8}  outcome")
    for path in files:
        try:
            done = subprocess.run(
                [sys.executable, "-c", _ONE, str(path), str(stack_kb)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            row = {"outcome": f"no answer within {timeout:.0f} s"}
        else:
            if done.returncode != 0:
                row = {"outcome": f"process died (exit status {done.returncode})"}
            else:
                row = json.loads(done.stdout.splitlines()[-1])
        ms = f"{row['seconds'] * 1000:.1f}" if "seconds" in row else "-"
        peak = f"{row['peak'] / 2**20:.1f}" if "peak" in row else "-"
        rss = f"{row['rss'] / 2**20:.0f}" if "rss" in row else "-"
        size = path.stat().st_size
        print(f"{path.name:42} {size:>9} {ms:>9} {peak:>9} {rss:>8}  {row['outcome'][:70]}")


def normal() -> None:
    import numpy as np

    from pygirder import codec

    values = {
        "10,000 small dicts": [{"id": i, "name": f"n{i}", "score": i / 3} for i in range(10_000)],
        "1 MB float64 array": np.random.default_rng(0).random(131_072),
        "10,000 pairs (tuples)": [(i, i * 2.0) for i in range(10_000)],
        "set of 10,000 ints": set(range(10_000)),
        "dict of 2,000 tuple keys": {(i, str(i)): i for i in range(2_000)},
        "tuples nested 400 deep": _nest(400),
    }
    print(f"{'value':28} {'bytes':>9} {'decode µs (CPU)':>16}")
    for name, value in values.items():
        data = codec.encode(value)
        # CPU time, not wall time: these machines are shared, and waiting for a core
        # is not the decoder's cost.
        timer = timeit.Timer(lambda data=data: codec.decode(data), timer=time.process_time)
        number, _ = timer.autorange()
        best = min(timer.repeat(repeat=7, number=number)) / number
        print(f"{name:28} {len(data):>9} {best * 1e6:>16.1f}")


def _nest(levels: int) -> object:
    value: object = 0
    for _ in range(levels):
        value = (value,)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--normal", action="store_true", help="ordinary values only")
    parser.add_argument("--hostile", action="store_true", help="hostile inputs only")
    parser.add_argument("--stack-kb", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not args.hostile:
        normal()
        print()
    if not args.normal:
        files = args.files or sorted(p for p in CORPUS.iterdir() if p.is_file())
        hostile(files, args.stack_kb, args.timeout)


if __name__ == "__main__":
    main()
