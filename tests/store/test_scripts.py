"""The server-side scripts: one .lua file each, keys from the one schema, a thin facade.

The static checks read the .lua files: each documents its KEYS and ARGV, names no
key itself (every key comes in KEYS, or is derived from a stem of ``store.keys``
passed in ARGV, which the header says), and the facade hands every script keys of
one namespace, all in one cluster slot.  ``test_cluster.py`` runs them for real.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib import resources

import msgpack
import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from pygirder.store import scripts
from pygirder.store.keys import Keys

LUA = resources.files("pygirder.store").joinpath("lua")
FILES = {
    p.name.removesuffix(".lua"): p.read_text() for p in LUA.iterdir() if p.name.endswith(".lua")
}


def split_lua(text: str) -> tuple[str, list[str]]:
    """The code of a Lua file without its comments, and its string literals."""
    code, literals, i = [], [], 0
    while i < len(text):
        c = text[i]
        if text.startswith("--", i):
            assert not text.startswith("--[[", i), "long comments are not used"
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif c in "'\"":
            j, literal = i + 1, []
            while text[j] != c:
                if text[j] == "\\":
                    literal.append(text[j : j + 2])
                    j += 2
                else:
                    literal.append(text[j])
                    j += 1
            literals.append("".join(literal))
            code.append(text[i : j + 1])
            i = j + 1
        else:
            code.append(c)
            i += 1
    return "".join(code), literals


def header(text: str) -> str:
    """The header comment, as one line of words."""
    lines = text.splitlines()[1:]
    comment = lines[: next(i for i, line in enumerate(lines) if not line.startswith("--"))]
    return " ".join(" ".join(line.removeprefix("--").split()) for line in comment)


def key_kinds() -> set[str]:
    """Every kind of key of the schema: 'res', 'st', 'stats', ..."""
    keys, kinds = Keys("ns"), set()
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name == "namespace":
            continue
        key = getattr(keys, name)("ID") if callable(member) else getattr(keys, name)
        if name != "prefix":
            kinds.add(key.removeprefix(keys.prefix).removesuffix("ID").rstrip(":"))
    return kinds


def test_every_script_is_a_lua_file_with_its_keys_and_arguments_documented():
    assert set(FILES) == {s.name for s in scripts.ALL}
    for name, text in FILES.items():
        first, second = text.splitlines()[:2]
        assert first == "#!lua", f"{name}.lua: without the shebang a cluster does not check slots"
        assert second.startswith(f"-- {name}: "), f"{name}.lua: the header names the script"
        doc = header(text)
        assert "KEYS" in doc and "ARGV" in doc and "Derived keys:" in doc, name
        assert "Returns" in doc, f"{name}.lua: the header says what the script returns"


def test_no_script_names_a_key_of_its_own():
    kinds = key_kinds()
    assert {"res", "st", "wt", "q", "inbox", "kids", "stats", "wprocs"} <= kinds
    for name, text in FILES.items():
        code, literals = split_lua(text)
        for literal in literals:
            where = f"{name}.lua: string {literal!r}"
            assert "pg:" not in literal and "{" not in literal, f"{where} spells a key"
            assert literal not in kinds and not literal.endswith(":"), f"{where} spells a key"
            assert not any(literal.startswith(k + ":") for k in kinds), f"{where} spells a key"
        # no command gets a literal where a key goes
        assert not re.search(r"redis\.call\(\s*'\w+'\s*,\s*['\"]", code), name


def test_keys_a_script_derives_come_from_stems_in_argv_and_are_documented():
    for name, text in FILES.items():
        code, _ = split_lua(text)
        doc = header(text)
        stems = set(re.findall(r"\b\w+_stem\b", code))
        if not stems:
            assert "Derived keys: none." in doc, f"{name}.lua derives no key: say so"
            continue
        assert "hash tag" in doc and "Derived keys: none" not in doc, name
        for stem in stems:
            assert re.search(rf"local [\w, ]*\b{stem}\b[\w, ]* = [^\n]*ARGV", code), (
                f"{name}.lua: {stem} is not read from ARGV"
            )
        # a derived key is a stem followed by data, never a literal
        for use in re.findall(r"\w+_stem \.\. (\S+)", code):
            assert not use.startswith(("'", '"')), f"{name}.lua: {use}"


def test_each_per_id_key_is_its_stem_followed_by_the_id():
    keys = Keys("a*b")
    for name in ("result", "state", "waiters", "queue", "idle", "inbox", "inflight", "owned",
                 "current", "waits", "heartbeat", "call", "children"):  # fmt: skip
        method = getattr(keys, name)
        assert method("some-id") == method("") + "some-id", name
        assert method("").startswith(keys.prefix) and keys.prefix == "pg:{a*b}:"


class Capture:
    """A runner that returns what it was asked to run."""

    def run_script(self, script, keys, args):
        return script, keys, args


def every_call(keys: Keys) -> list[tuple[scripts.Script, list, list]]:
    conn, ids = Capture(), ["id-1", "id-2"]
    sub = [scripts.Submission(i, b"p", "pool-x", n == 0, "m:f", "()") for n, i in enumerate(ids)]
    done = [scripts.Completion(i, b"Oresult", 0, 1.5, "ok") for i in ids]
    return [
        scripts.submit(conn, keys, sub, process="proc", owner="w", parent="p", graph_ttl=60),
        scripts.take(conn, keys, pool="pool-x", worker="w", max=4, moved=b"\xffjunk"),
        scripts.complete(conn, keys, done, worker="w"),
        scripts.share(conn, keys, ids, pool="pool-x", worker="w", force=True),
        scripts.requeue(conn, keys, [*ids, b"\xffjunk"], worker="w", dead=True, max_attempts=3),
        scripts.cancel(conn, keys, ids, process="proc"),
        scripts.reach(conn, keys, ids, target="t", budget=100, cursor="0"),
        scripts.distribute(conn, keys, child="c", parent="p", distributor="d", max_moves=5),
        scripts.withdraw(conn, keys, process="proc", max=10),
        scripts.take(conn, keys, pool="pool-x", worker="w", max=4, waits=True),
        scripts.complete(conn, keys, done, worker="w", idle_pool="pool-x"),
    ]


def test_the_facade_gives_every_script_keys_of_one_slot_and_stems_of_its_namespace():
    keys = Keys("tagged")
    calls = every_call(keys)
    assert {s.name for s, _, _ in calls} == {s.name for s in scripts.ALL}
    slot = key_slot(keys.prefix.encode())
    for script, script_keys, args in calls:
        assert script_keys, f"{script.name} declares no key"
        for key in script_keys:
            raw = key.encode() if isinstance(key, str) else key
            assert raw.startswith(keys.prefix.encode()), (script.name, key)
            assert key_slot(raw) == slot, (script.name, key)
        for arg in args:  # what looks like a key in ARGV is a stem (or a member: inbox)
            if isinstance(arg, str) and arg.startswith("pg:"):
                assert arg.startswith(keys.prefix), (script.name, arg)


def test_a_script_whose_keys_do_not_match_its_arguments_is_refused(client):
    items = msgpack.packb(["id", "p", "default", "q", "m:f", ""], use_bin_type=False)
    with pytest.raises(redis.ResponseError, match="expected 5 and 5 per call"):
        scripts.SUBMIT.run_sync(client, ["pg:{t}:stats"] * 5, ["", "", "", 0, "", items])
    with pytest.raises(redis.ResponseError, match="expected 3 per id"):
        scripts.CANCEL.run_sync(client, ["pg:{t}:stats"], ["inbox", "id"])
    with pytest.raises(redis.ResponseError, match="expected one per id"):
        scripts.SHARE.run_sync(client, ["pg:{t}:x"] * 4, ["w", "1", "id"])
    with pytest.raises(redis.ResponseError, match="expected 2 per id"):
        scripts.REQUEUE.run_sync(client, ["pg:{t}:x"] * 5, ["w", "0", 0, "s", "r", "q", "id"])
    with pytest.raises(redis.ResponseError, match="expected 4 per result"):
        scripts.COMPLETE.run_sync(client, ["pg:{t}:x"] * 6,
                                  ["w", 10, "i", "0", "s", "", "id", "O", 0, 1, "s"])  # fmt: skip
    with pytest.raises(redis.ResponseError, match="needs its 3 keys"):
        scripts.TAKE.run_sync(client, ["pg:{t}:x"] * 5,
                              ["w", 1, "s", "r", "c", "0", "i", "s", "moved"])  # fmt: skip


def test_a_server_that_forgot_the_scripts_is_sent_them_again(client, redis_url):
    keys = Keys("reload")
    client.script_flush()
    reply = scripts.distribute(scripts.SyncRunner(client), keys, child="c", parent="p",
                               distributor="d", max_moves=1)  # fmt: skip
    assert reply == [0, 0] and client.script_exists(scripts.DISTRIBUTE.sha) == [True]

    async def main() -> object:
        conn = aioredis.Redis.from_url(redis_url)
        try:
            await conn.script_flush()
            return await scripts.withdraw(scripts.AsyncRunner(conn), keys, process="p", max=1)
        finally:
            await conn.aclose()

    assert asyncio.run(main()) == [0, 0, 0]
    assert client.script_exists(scripts.WITHDRAW.sha) == [True]


def test_the_scripts_read_their_limits_from_python_and_keep_their_line_numbers():
    for script in scripts.ALL:
        declared = script.source.splitlines()[1].split(" -- ")[0]
        names, values = declared.removeprefix("local ").split(" = ")
        constants = dict(zip(names.split(", "), map(int, values.split(", ")), strict=True))
        assert constants == scripts.LUA_CONSTANTS
        # declared on the header's first line: a Lua error names the file's line
        assert script.source.count("\n") == FILES[script.name].count("\n")


def test_no_python_module_but_the_schema_spells_a_key():
    """Python builds keys through ``Keys`` only (its stems for SCAN patterns)."""
    import ast
    from pathlib import Path

    import pygirder

    kinds = key_kinds()
    root = Path(pygirder.__file__).parent
    for py in root.rglob("*.py"):
        if py == root / "store" / "keys.py":
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                spelled = text.startswith("pg:{") or any(text.startswith(k + ":") for k in kinds)
                assert not spelled, f"{py.relative_to(root)}: {text!r} spells a key"
