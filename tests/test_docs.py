"""The API reference: it covers the public API, and `make docs` builds it in strict mode.

The examples of README.md and docs/*.md run through the Sybil hook of the
repository's conftest.py; these tests keep the generated reference honest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pygirder

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def documented(page: str) -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)$", (DOCS / page).read_text(), re.MULTILINE))


def test_every_public_name_has_a_reference_entry():
    names = {f"pygirder.{n}" for n in pygirder.__all__ if not n.startswith("__")}
    missing = names - documented("api.md")
    assert not missing, f"add `::: NAME` entries for these to docs/api.md: {sorted(missing)}"


def test_the_cloud_verbs_have_reference_entries():
    # The functions behind `pygirder cloud setup|plan|teardown|status`, `image build`,
    # `artifact push`, `up|fleet|down` and `rehearse`.
    verbs = {
        "pygirder.cloud.account.setup", "pygirder.cloud.account.plan",
        "pygirder.cloud.account.teardown", "pygirder.cloud.account.status",
        "pygirder.cloud.image.build_image", "pygirder.cloud.artifacts.build_artifact",
        "pygirder.cloud.artifacts.push_artifact", "pygirder.cloud.fleet.up",
        "pygirder.cloud.fleet.fleet_status", "pygirder.cloud.fleet.down",
        "pygirder.cloud.sim.rehearse.rehearse",
    }  # fmt: skip
    entries = documented("api-cloud.md")
    assert verbs - entries == set()
    for entry in entries:  # each entry names something that exists
        module, _, name = entry.rpartition(".")
        assert hasattr(__import__(module, fromlist=[name]), name), entry


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_docs_builds_the_site_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    api = (site / "api" / "index.html").read_text()
    assert 'id="pygirder.connect"' in api and 'id="pygirder.RemoteError"' in api
    cloud = (site / "api-cloud" / "index.html").read_text()
    assert 'id="pygirder.cloud.artifacts.push_artifact"' in cloud
