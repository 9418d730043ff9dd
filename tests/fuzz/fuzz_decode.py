"""Coverage-guided fuzzing of the decoder with atheris (libFuzzer for Python).

Every input must decode or raise CodecError, within libFuzzer's ``-timeout`` and
``-rss_limit_mb``.  Run it for as long as you like (atheris is in the dev extras on
Linux); the first folder collects what the fuzzer finds, the corpus is read only::

    mkdir -p /tmp/found
    python tests/fuzz/fuzz_decode.py /tmp/found tests/fuzz/corpus \\
        -max_total_time=600 -timeout=1 -rss_limit_mb=1024 -max_len=1048576

A failing input is written as ``crash-*``, ``timeout-*`` or ``oom-*``; after the fix,
copy it into ``tests/fuzz/corpus/`` under a name that says what it is, and
``tests/test_codec_hostile.py`` replays it on every run.  With ``PYGIRDER_FUZZ_STRICT=1``
an input that takes longer than 100 ms or allocates more than 64 MB also counts as a
crash (slower: every input is traced).
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc

import atheris

with atheris.instrument_imports():
    from pygirder import codec
    from pygirder.errors import CodecError

STRICT = os.environ.get("PYGIRDER_FUZZ_STRICT") == "1"
MAX_SECONDS = 0.1
MAX_PEAK_BYTES = 64 * 1024 * 1024


def test_one_input(data: bytes) -> None:
    if STRICT:
        tracemalloc.start()
        started = time.process_time()
    try:
        codec.decode(data)
    except CodecError:
        pass
    if STRICT:
        elapsed = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak > MAX_PEAK_BYTES:
            raise AssertionError(f"{len(data)} bytes took {peak / 2**20:.1f} MiB to decode")
        # Traced decodes run a few times slower: the bound allows for it.
        if elapsed > 4 * MAX_SECONDS:
            raise AssertionError(f"{len(data)} bytes took {elapsed * 1000:.0f} ms to decode")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
