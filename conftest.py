"""The Python examples of README.md and docs/*.md run as tests, through Sybil.

Each ```python block is a program of its own: it is written to a file and run with
this interpreter as ``python example.py``, the way a reader runs it, so a grid
example starts its own private grid (``pygirder.connect()``) and its grid
functions live in ``__main__``.  An example that cannot run here (it needs AWS or
a server elsewhere) is preceded by ``<!-- skip: next "why" -->``; the reason shows
in the test report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

EXAMPLE_TIMEOUT_S = 120


def run_as_script(example: Example) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYGIRDER_")}
    with tempfile.TemporaryDirectory(prefix="pygirder-doc-") as tmp:
        env["PYGIRDER_STORE"] = str(Path(tmp, "results"))  # the default, out of ~/.cache
        script = Path(tmp, f"{Path(example.path).stem}_line{example.line}.py")
        script.write_text(str(example.parsed))
        out = subprocess.run(
            [sys.executable, str(script)], cwd=tmp, env=env, capture_output=True, text=True,
            timeout=EXAMPLE_TIMEOUT_S, check=False,
        )  # fmt: skip
    if out.returncode != 0:
        raise AssertionError(
            f"the example at {example.path}:{example.line} exited {out.returncode}:\n"
            f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        )


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=run_as_script), SkipParser()],
    patterns=["README.md", "docs/*.md"],
).pytest()
