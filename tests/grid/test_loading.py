"""Which modules a request may make a worker import, and scripts with or without a main guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

import gridfuncs as gf
import pygirder
from pygirder.grid.loading import ImportPolicy, ImportRefused

PLANTED = """
with open({marker!r}, "w") as fh:
    fh.write("imported")

import pygirder

@pygirder.fn
def f(a, b=0):
    return "planted code ran"
"""


def _forged(name: str) -> pygirder.GridFunction:
    """A grid function whose name points at another module, as a crafted request would."""
    forged = object.__new__(pygirder.GridFunction)  # not registered: gridfuncs:add stays
    vars(forged).update(vars(gf.add), name=name)
    return forged


def test_a_request_cannot_make_a_worker_import_a_module_dropped_in_its_folder(
    grid_factory, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "marker"
    (work / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(work)  # the workers start here, with this folder on their path
    grid = grid_factory(workers=1)

    with pytest.raises(pygirder.RemoteError) as info:
        grid.run(_forged("planted:f")(1), timeout=30)
    assert info.value.remote_type == "import refused"
    assert "cannot import module 'planted' for planted:f" in info.value.message
    assert "--allow-module planted" in info.value.message
    assert not marker.exists()
    with pytest.raises(pygirder.RemoteError, match="was not given the caller's script"):
        grid.run(_forged("__main__:f")(1), timeout=30)  # pytest has no script to load
    # the packages of the functions registered before connect() stay allowed
    assert grid.run(gf.add(1, 2), timeout=30) == 3


def _module(folder, name: str, body: str = "", marker=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    head = f"with open({str(marker)!r}, 'a') as fh:\n    fh.write({name!r} + ' ')\n"
    head = head if marker else ""
    (folder / f"{name}.py").write_text(head + body)


def test_the_policy_allows_named_packages_and_the_script_folder_only(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    script_dir, elsewhere = tmp_path / "proj", tmp_path / "site"
    marker = tmp_path / "imported"
    named, nearby, outside = f"named_{tag}", f"nearby_{tag}", f"outside_{tag}"
    _module(elsewhere / named, "__init__", marker=marker)
    _module(elsewhere / named, "jobs", marker=marker)
    _module(script_dir / "pkg", "__init__", marker=marker)
    _module(script_dir / "pkg", nearby, marker=marker)
    _module(elsewhere, outside, marker=marker)
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.syspath_prepend(str(script_dir))
    policy = ImportPolicy((named,), script_dir=str(script_dir))

    policy.import_for_request(f"{named}.jobs")  # inside an allowed package
    policy.import_for_request(f"pkg.{nearby}")  # in the script's folder
    with pytest.raises(ImportRefused, match=f"--allow-module {outside}"):
        policy.import_for_request(outside)
    with pytest.raises(ImportRefused):
        policy.import_for_request("antigravity")  # the standard library is not allowed either
    assert "antigravity" not in sys.modules
    with pytest.raises(ImportRefused):
        ImportPolicy((named,)).import_for_request(f"{named}x")  # a prefix of the name is not
    with pytest.raises(ModuleNotFoundError):
        ImportPolicy((named,)).import_for_request(f"{named}.missing")
    ImportPolicy(auto_import=True).import_for_request(outside)  # trusted grids: anything
    with pytest.raises(ImportRefused, match="entry point"):
        ImportPolicy(("pygirder",)).import_for_request("pygirder.__main__")  # would run the CLI
    assert marker.read_text().split() == ["__init__", "jobs", "__init__", nearby, outside]
    for name in list(sys.modules):
        if tag in name or name == "pkg":
            monkeypatch.delitem(sys.modules, name)


def test_a_module_owned_by_another_user_is_never_imported_for_a_request(tmp_path, monkeypatch):
    name = f"foreign_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    _module(tmp_path / "shared", name, marker=marker)
    path = tmp_path / "shared" / f"{name}.py"
    if os.getuid() == 0:
        os.chown(path, 4242, 4242)  # as if another local user had written it
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)
    monkeypatch.syspath_prepend(str(tmp_path / "shared"))

    with pytest.raises(ImportRefused, match="belongs to uid"):
        ImportPolicy((name,)).import_for_request(name)  # even when allowed by name
    assert not marker.exists() and name not in sys.modules


JOBS = """
import pygirder

@pygirder.fn
def cube(x):
    return x ** 3

@pygirder.fn
def norm1(point):
    return point.x + point.y
"""

LATER = """
import pygirder

@pygirder.fn
def double(x):
    return 2 * x
"""


def _run(tmp_path, script: str, *args: str, modules: dict[str, str] | None = None, **env: str):
    """Run ``script`` as `python job.py` from another folder; return the finished process."""
    proj, work = tmp_path / "proj", tmp_path / "work"
    proj.mkdir()
    work.mkdir(exist_ok=True)
    for name, body in (modules or {}).items():
        (proj / f"{name}.py").write_text(textwrap.dedent(body))
    (proj / "job.py").write_text(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(proj / "job.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=work, env=dict(os.environ, **env),
    )  # fmt: skip


GUARDED = """
from dataclasses import dataclass

import pygirder
from jobs import cube, norm1

@pygirder.register
@dataclass
class Point:
    x: int
    y: int

@pygirder.fn
def sq(x):
    return x * x

if __name__ == "__main__":
    with pygirder.connect(workers=1) as grid:
        # a class of the script as the argument of a module's function
        print(grid.run(norm1(Point(1, 2))), grid.run(sq(3)), grid.run(cube(2)))
"""


@pytest.mark.slow
def test_a_guarded_script_runs_its_own_and_imported_functions(tmp_path):
    out = _run(tmp_path, GUARDED, modules={"jobs": JOBS})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "9", "8"]


UNGUARDED_MODULE_ONLY = """
import pygirder
from jobs import cube

with open("runs.log", "a") as log:  # in the working folder, which the workers share
    log.write("ran\\n")
with pygirder.connect(workers=1) as grid:
    print(grid.run(cube(3)))
"""


@pytest.mark.slow
def test_an_unguarded_script_using_functions_from_a_module(tmp_path):
    out = _run(tmp_path, UNGUARDED_MODULE_ONLY, modules={"jobs": JOBS})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["27"]
    # the workers never needed the script, so its top level (and its grid) ran once
    assert (tmp_path / "work" / "runs.log").read_text() == "ran\n"


UNGUARDED = """
import pygirder
from jobs import cube

print("top level")

@pygirder.fn
def sq(x):
    return x * x

@pygirder.fn
def total(n):
    return sum(pygirder.wait(*(sq(i) for i in range(n))))

grid = pygirder.connect(workers=1)

@pygirder.fn
def late(x):
    return x

print(grid.run(sq(3)), grid.run(cube(2)), grid.run(total(4)))
try:
    grid.run(late(1))
except pygirder.RemoteError as exc:
    print("late:", exc.message)
grid.close()
"""


@pytest.mark.slow
def test_an_unguarded_script_defining_its_functions(tmp_path):
    out = _run(tmp_path, UNGUARDED, modules={"jobs": JOBS})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["top level", "9 8 14"]
    [late] = lines[2:]
    job = tmp_path / "proj" / "job.py"
    line = 1 + UNGUARDED.splitlines().index("grid = pygirder.connect(workers=1)")
    assert late.startswith("late: __main__:late is not defined in")
    assert f"pygirder.connect() at {job}:{line}" in late
    assert 'if __name__ == "__main__":' in late


SCRIPT_FOLDER = """
import pygirder
from jobs import cube

if __name__ == "__main__":
    with pygirder.connect(workers=1) as grid:
        import later  # registered after connect(): allowed, it lies next to the script

        print(grid.run(later.double(4)))
        forged = object.__new__(pygirder.GridFunction)
        vars(forged).update(vars(cube), name="planted:f")  # in the working folder
        try:
            grid.run(forged(1))
        except pygirder.RemoteError as exc:
            print(exc.remote_type, "|", exc.message)
"""


@pytest.mark.slow
def test_local_workers_import_modules_next_to_the_script_but_not_from_the_working_folder(
    tmp_path,
):
    marker = tmp_path / "marker"
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    out = _run(tmp_path, SCRIPT_FOLDER, modules={"jobs": JOBS, "later": LATER})
    assert out.returncode == 0, out.stderr
    double, refusal = out.stdout.splitlines()
    assert double == "8"
    assert refusal.startswith("import refused | ") and "module 'planted'" in refusal
    assert not marker.exists()


FAILING_TOP_LEVEL = """
import sys
import pygirder
from jobs import cube

if len(sys.argv) < 2:
    sys.exit("usage: job.py N")

@pygirder.fn
def sq(x):
    return x * x

grid = pygirder.connect(workers=1)
try:
    print(grid.run(sq(int(sys.argv[1]))))
except pygirder.RemoteError as exc:
    print("error:", exc.message)
print(grid.run(cube(2)))
grid.close()
"""


@pytest.mark.slow
def test_a_script_whose_top_level_exits_in_the_worker_gets_a_clear_error(tmp_path):
    out = _run(tmp_path, FAILING_TOP_LEVEL, "3", modules={"jobs": JOBS})
    assert out.returncode == 0, out.stderr
    error, cube = out.stdout.splitlines()
    assert error.startswith("error: __main__:sq could not be loaded")
    assert "raised SystemExit: usage: job.py N" in error
    assert 'if __name__ == "__main__":' in error
    assert cube == "8"  # the worker that ran the script's sys.exit() lives on


def test_pygirder_worker_imports_allowed_modules_on_first_use_and_refuses_others(
    grid_factory, tmp_path
):
    marker = tmp_path / "marker"
    (tmp_path / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    (tmp_path / "exits.py").write_text("import sys\n\nsys.exit(3)\n")
    grid = grid_factory(workers=0)
    tests = os.path.dirname(os.path.dirname(__file__))  # where gridfuncs lives
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), tests]))
    cmd = [sys.executable, "-m", "pygirder", "worker", "--redis", grid.url, "--namespace",
           grid.namespace, "--processes", "2", "--allow-module", "gridfuncs",
           "--allow-module", "exits"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    try:
        grid.wait_for_workers(2, timeout=30)
        pids = {w["pid"] for w in grid.workers().values()}
        assert grid.map(gf.add, [(i, 1) for i in range(8)], timeout=30) == list(range(1, 9))
        with pytest.raises(pygirder.RemoteError, match="--allow-module planted"):
            grid.run(_forged("planted:f")(1), timeout=30)
        assert not marker.exists()
        with pytest.raises(pygirder.RemoteError, match="raised SystemExit: 3") as info:
            grid.run(_forged("exits:f")(1), timeout=30)  # allowed, but its top level exits
        assert info.value.remote_type == "import failed"
        assert grid.run(gf.add(5, 5), timeout=30) == 10
        assert {w["pid"] for w in grid.workers().values()} == pids  # no process died
    finally:
        proc.terminate()
        proc.wait(30)


SLOW_TOP_LEVEL = """
import time
import pygirder

@pygirder.fn
def sq(x):
    return x * x

if __name__ != "__main__":
    time.sleep(4)  # a slow top level in the workers (a heavy import, say)

if __name__ == "__main__":
    with pygirder.connect(workers=2) as grid:
        print(grid.run(sq(3)), grid.stats().get("dead_workers", 0))
"""


@pytest.mark.slow
def test_a_slow_script_load_keeps_the_worker_alive(tmp_path):
    out = _run(tmp_path, SLOW_TOP_LEVEL, PYGIRDER_HEARTBEAT_TTL="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", "0"]  # no worker was taken for dead while loading
