"""The wheel users install: it carries every data file the code opens, and it runs.

The source tree drives every check: the package-data globs of pyproject.toml, the
non-Python files under src/pygirder, and the files the code opens next to itself
(``importlib.resources.files(...).joinpath(NAME)``, ``Path(__file__).with_name(NAME)``,
``Path(__file__).parent / NAME``).  A glob that matches nothing, a data file no glob
ships, or a file the code opens that is not in the wheel fails here, not on a user's
machine.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from pygirder.store import scripts

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "pygirder"


def package_data_globs() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["pygirder"]


def source_files() -> set[str]:
    """Every file of the package in the source tree, relative to src/pygirder."""
    return {
        p.relative_to(PKG).as_posix()
        for p in PKG.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


def data_files() -> set[str]:
    return {f for f in source_files() if not f.endswith(".py")}


def _opened_next_to(py: Path) -> set[str]:
    tree = ast.parse(py.read_text())
    constants = {
        target.id: node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("joinpath", "with_name")
        ):
            base, names, ups = ast.unparse(node.func.value), node.args, 0
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            base, names, ups = ast.unparse(node.left), [node.right], -1
        else:
            continue
        if "__file__" not in base and "resources.files" not in base:
            continue
        ups += base.count(".parent")
        if "__file__" in base and ups < 0:
            continue  # Path(__file__) / x: not a sibling
        where = py.parent
        for _ in range(max(ups, 0)):
            where = where.parent
        parts = []
        for name in names:
            value = name.value if isinstance(name, ast.Constant) else None
            if isinstance(name, ast.Name):
                value = constants.get(name.id)
            if not isinstance(value, str):
                break
            parts.append(value)
        if parts:
            found.add(where.joinpath(*parts).relative_to(PKG).as_posix())
    return found


def opened_files() -> set[str]:
    """Files (or directories) the code opens next to itself, relative to src/pygirder."""
    return set().union(*(_opened_next_to(py) for py in PKG.rglob("*.py")))


def matched(globs: list[str], files: set[str]) -> dict[str, set[str]]:
    return {
        g: {f for f in files if Path(f).match(g) and f.count("/") == g.count("/")} for g in globs
    }


def test_the_scan_finds_the_files_the_code_opens():
    # A check on the checker: these are opened today, so the scan must see them.
    opened = {"cloud/instance/image-bake.sh", "cloud/instance/pygirder-boot.sh", "dashboard/static",
              "store/lua"}  # fmt: skip
    assert opened <= opened_files()


def test_package_data_globs_match_the_source_tree():
    globs = package_data_globs()
    files = data_files()
    empty = [g for g, hits in matched(globs, files).items() if not hits]
    assert not empty, f"package-data globs that match no file under src/pygirder: {empty}"
    shipped = set().union(*matched(globs, files).values())
    assert files - shipped == set(), "data files no package-data glob ships: add a glob"
    for path in opened_files():
        target = PKG / path
        assert target.exists(), f"the code opens src/pygirder/{path}, which does not exist"
        inside = {path} if target.is_file() else {f for f in files if f.startswith(path + "/")}
        assert inside, f"src/pygirder/{path} is empty"
        assert all(f.endswith(".py") or f in shipped for f in inside), path


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as `python -m build` builds them."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)])
    (wheel,) = out.glob("pygirder-*.whl")
    (sdist,) = out.glob("pygirder-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_ships_every_source_file_and_data_file(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        in_wheel = {n.removeprefix("pygirder/") for n in zf.namelist() if n.startswith("pygirder/")}
    missing = source_files() - in_wheel
    assert not missing, f"files of src/pygirder missing from the wheel: {sorted(missing)}"
    for glob, hits in matched(package_data_globs(), in_wheel).items():
        assert hits, f"package-data glob {glob!r} matches nothing in the wheel"
    for path in opened_files():
        assert path in in_wheel or any(f.startswith(path + "/") for f in in_wheel), path
    lua = {f for f in in_wheel if f.startswith("store/lua/")}
    assert lua == {f"store/lua/{s.name}.lua" for s in scripts.ALL}, "the server-side scripts"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_wheel_runs_the_demo_and_builds_an_artifact(built, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python, cli = venv / "bin" / "python", venv / "bin" / "pygirder"
    _run([str(python), "-m", "pip", "install", "--quiet", f"{built['wheel']}[cloud]"])
    work = tmp_path / "work"  # not the checkout: nothing of src/ may be importable
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(python), "-c", "import pygirder; print(pygirder.__file__)"], cwd=work,
                 env=env).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv)), where

    demo = _run([str(cli), "demo", "--depth", "3", "--fanout", "3", "--steps", "8",
                 "--workers", "2"], cwd=work, env=env)  # fmt: skip
    assert "45 unique calls" in demo.stdout and "FAILED" not in demo.stdout

    # The artifact step of a rehearsal: re-pack the installed pygirder (its data
    # files too) with a project, as `pygirder cloud artifact push` does.
    project = work / "jobs"
    project.mkdir()
    (project / "jobs.py").write_text("import pygirder\n\n@pygirder.fn\ndef one() -> int:\n"
                                     "    return 1\n")  # fmt: skip
    pushed = _run([str(cli), "cloud", "artifact", "push", str(project), "--dry-run", "--json",
                   "--out", str(tmp_path / "out")], cwd=work, env=env)  # fmt: skip
    manifest = json.loads(pushed.stdout)["manifest"]
    assert [w["name"] for w in manifest["wheels"]] == ["jobs", "pygirder"]
    # The scripts an image bake and an instance's boot read, and the dashboard's files.
    check = (
        "from pygirder.cloud.image import boot_robot_script, render_bake_script\n"
        "from pygirder.dashboard.app import STATIC_DIR\n"
        "script = render_bake_script(build_id='b-1', topic_arn='arn:aws:sns:us-east-1:1:t',"
        " wheel_url='https://example.invalid/w.whl', wheel_name='pygirder-0-py3-none-any.whl',"
        " wheel_sha256='0' * 64)\n"
        "assert boot_robot_script().rstrip() in script\n"
        "print(sorted(p.name for p in STATIC_DIR.iterdir()))\n"
        "from pygirder.store import scripts\n"
        "print(sorted(s.name for s in scripts.ALL if s.source.startswith('#!lua')))\n"
    )
    static = _run([str(python), "-c", check], cwd=work, env=env).stdout
    assert "index.html" in static
    assert str(sorted(s.name for s in scripts.ALL)) in static  # loaded from the wheel
