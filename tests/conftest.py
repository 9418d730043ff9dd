"""Every test starts with the durable result store off, unless it turns one on itself.

The default store is the user's cache folder: a test must neither write there nor be
answered from results an earlier run left there.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _durable_store_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGIRDER_STORE", "off")
