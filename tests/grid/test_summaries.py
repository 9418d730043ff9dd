"""The call graph's one-line summaries: the short cut for scalars renders what the
general (reprlib) path renders."""

from __future__ import annotations

from pygirder.grid import protocol


def _general(value: object, limit: int = 200) -> str:
    try:
        text = protocol._short.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def test_scalar_summaries_match_the_general_path():
    values = [
        None, True, False, 0, -5, 10**37, -(10**37), 10**38, -(10**38), 10**39, 10**5000,
        1.5, float("nan"), -1e300, "", "x" * 60, "x" * 61, "\n" * 40, "é" * 30, "a'b",
        "x" * 58 + "'", 'q"' * 20,
    ]  # fmt: skip
    for value in values:
        assert protocol.summarize(value) == _general(value), value
    assert protocol.summarize("x" * 50, limit=20) == _general("x" * 50, limit=20)
