"""Control plane, acceptance 7 (issue 4): the KV store: put/get/delete, check-and-set conflicts,
blocking reads with an index, and watches (`smesh kv watch` and the HTTP NDJSON stream) that see
each change in order."""
import base64
import json
import threading
import time

import pytest

from meshlib import SMESH_BIN, _clean_cli_env, wait_until


def _put(cp, key, value, cas=None, token=True):
    path = f"/v1/kv/{key}" + (f"?cas={cas}" if cas is not None else "")
    r = cp.api("PUT", path, body=value, token=token)
    return r


def _index(r):
    return int(r.header("x-smesh-index"))


def _entry(cp, key):
    r = cp.api("GET", f"/v1/kv/{key}", token=False)
    if r.status == 404:
        return None
    assert r.status == 200, r
    items = r.json()
    assert len(items) == 1 and items[0]["Key"] == key, items
    return items[0]


def _value(entry):
    return base64.b64decode(entry["Value"])


def _cli_index(r):
    out = r.stdout.strip()
    assert out.startswith("ok (index ") and out.endswith(")"), r
    return int(out[len("ok (index "):-1])


@pytest.mark.timeout(60)
def test_kv_put_get_delete(run):
    cp = run.control()
    r = cp.cli("kv", "put", "app/greeting", "hello mesh world")
    assert r.returncode == 0, r
    i1 = _cli_index(r)
    r = cp.cli("kv", "get", "app/greeting", token=False)
    assert r.returncode == 0 and r.stdout == "hello mesh world\n", r

    e = _entry(cp, "app/greeting")
    assert _value(e) == b"hello mesh world" and e["ModifyIndex"] == i1 and e["CreateIndex"] == i1, e
    r = cp.api("GET", "/v1/kv/app/greeting?raw", token=False)
    assert r.status == 200 and r.body == b"hello mesh world" and _index(r) == i1, r

    # overwrite: ModifyIndex moves, CreateIndex stays
    r = cp.cli("kv", "put", "app/greeting", "second")
    assert r.returncode == 0, r
    i2 = _cli_index(r)
    assert i2 > i1
    e = _entry(cp, "app/greeting")
    assert _value(e) == b"second" and e["ModifyIndex"] == i2 and e["CreateIndex"] == i1, e

    # opaque bytes over HTTP, exactly as sent
    blob = bytes(range(256)) * 64
    r = _put(cp, "app/blob", blob)
    assert r.status == 200 and r.json() is True, r
    r = cp.api("GET", "/v1/kv/app/blob?raw", token=False)
    assert r.status == 200 and r.body == blob, (r.status, len(r.body))
    r = _put(cp, "app/empty", b"")
    assert r.status == 200 and r.json() is True, r
    assert _value(_entry(cp, "app/empty")) == b""

    # recurse lists everything under a prefix, and only that
    _put(cp, "apple", "not under app/")
    r = cp.api("GET", "/v1/kv/app/?recurse", token=False)
    assert r.status == 200, r
    assert sorted(x["Key"] for x in r.json()) == ["app/blob", "app/empty", "app/greeting"], r.json()

    # delete: CLI and HTTP; afterwards 404 / non-zero exit
    r = cp.cli("kv", "delete", "app/greeting")
    assert r.returncode == 0, r
    assert cp.api("GET", "/v1/kv/app/greeting", token=False).status == 404
    r = cp.cli("kv", "get", "app/greeting", token=False)
    assert r.returncode != 0 and r.stdout == "", r
    r = cp.api("DELETE", "/v1/kv/app/blob")
    assert r.status == 200 and r.json() is True, r
    assert _entry(cp, "app/blob") is None
    assert _entry(cp, "apple") is not None and _entry(cp, "app/empty") is not None

    # the size limit and bad keys are refused and store nothing
    r = _put(cp, "app/huge", b"x" * (2 * 1024 * 1024))
    assert 400 <= r.status < 500, r
    assert _entry(cp, "app/huge") is None
    for bad in ("/v1/kv//lead", "/v1/kv/a//b"):
        r = cp.api("PUT", bad, body="x")
        assert r.status == 400, (bad, r)


@pytest.mark.timeout(60)
def test_kv_check_and_set(run):
    cp = run.control()
    # cas=0: only if absent
    r = cp.cli("kv", "put", "lock/owner", "alice", "--cas", "0")
    assert r.returncode == 0, r
    i1 = _cli_index(r)
    r = cp.cli("kv", "put", "lock/owner", "bob", "--cas", "0")
    assert r.returncode != 0, r
    assert _value(_entry(cp, "lock/owner")) == b"alice"

    # a stale index loses; the current one wins
    r = cp.cli("kv", "put", "lock/owner", "carol")
    i2 = _cli_index(r)
    r = cp.cli("kv", "put", "lock/owner", "dave", "--cas", str(i1))
    assert r.returncode != 0, r
    e = _entry(cp, "lock/owner")
    assert _value(e) == b"carol" and e["ModifyIndex"] == i2, e
    r = cp.cli("kv", "put", "lock/owner", "erin", "--cas", str(i2))
    assert r.returncode == 0, r
    i3 = _cli_index(r)
    assert i3 > i2
    assert _value(_entry(cp, "lock/owner")) == b"erin"

    # HTTP: false on conflict, nothing written
    r = _put(cp, "lock/owner", "frank", cas=i2)
    assert r.status == 200 and r.json() is False, r
    assert _value(_entry(cp, "lock/owner")) == b"erin"
    r = _put(cp, "lock/owner", "frank", cas=i3)
    assert r.status == 200 and r.json() is True, r
    # a CAS delete with a stale index keeps the key
    r = cp.api("DELETE", f"/v1/kv/lock/owner?cas={i3}")
    assert r.status == 200 and r.json() is False, r
    assert _value(_entry(cp, "lock/owner")) == b"frank"

    # concurrent increments with CAS: no update is lost
    _put(cp, "counter", "0")
    per_thread, threads = 15, 6
    lock = threading.Lock()
    stats = {"ok": 0, "conflicts": 0, "errors": []}

    def incr():
        done = 0
        for _ in range(per_thread * 40):  # bounded retries
            if done == per_thread:
                return
            try:
                e = _entry(cp, "counter")
                r = _put(cp, "counter", str(int(_value(e)) + 1), cas=e["ModifyIndex"])
            except Exception as ex:
                with lock:
                    stats["errors"].append(repr(ex))
                continue
            if r.status != 200:
                with lock:
                    stats["errors"].append(repr(r))
            elif r.json() is True:
                done += 1
                with lock:
                    stats["ok"] += 1
            else:
                with lock:
                    stats["conflicts"] += 1

    ts = [threading.Thread(target=incr, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(40)
    assert not stats["errors"], stats["errors"][:5]
    assert stats["ok"] == per_thread * threads, stats
    assert int(_value(_entry(cp, "counter"))) == per_thread * threads, (stats, _entry(cp, "counter"))


def _blocking_get(cp, path, out):
    t0 = time.monotonic()
    try:
        out["r"] = cp.api("GET", path, token=False, timeout=30)
    except Exception as e:
        out["e"] = e
    out["t"] = time.monotonic() - t0
    out["at"] = time.monotonic()


@pytest.mark.timeout(60)
def test_kv_blocking_read_with_index(run):
    cp = run.control()
    i1 = _index(_put(cp, "cfg/x", "v1"))

    # an index behind the current one answers at once
    t0 = time.monotonic()
    r = cp.api("GET", f"/v1/kv/cfg/x?index={i1 - 1}&wait=5s", token=False)
    assert r.status == 200 and _index(r) == i1 and _value(r.json()[0]) == b"v1", r
    assert time.monotonic() - t0 < 1.0

    # at the current index it blocks until the key changes, then answers the new value
    out = {}
    t = threading.Thread(target=_blocking_get, args=(cp, f"/v1/kv/cfg/x?index={i1}&wait=10s", out), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), f"blocking read answered without a change: {out}"
    # a change to another key does not wake it
    _put(cp, "cfg/y", "other")
    t.join(0.5)
    assert t.is_alive(), f"blocking read on cfg/x woke for cfg/y: {out}"
    put_at = time.monotonic()
    i2 = _index(_put(cp, "cfg/x", "v2"))
    t.join(5)
    assert not t.is_alive() and "e" not in out, out
    r = out["r"]
    assert r.status == 200 and _index(r) == i2 and _value(r.json()[0]) == b"v2", r
    assert out["at"] - put_at < 1.0, f"blocking read answered {out['at'] - put_at:.2f}s after the change"

    # nothing changes: it answers at the end of wait with the same index
    out = {}
    _blocking_get(cp, f"/v1/kv/cfg/x?index={i2}&wait=1s", out)
    r = out["r"]
    assert r.status == 200 and _index(r) == i2 and _value(r.json()[0]) == b"v2", r
    assert 0.9 <= out["t"] < 4.0, out["t"]

    # recurse wakes for any key under the prefix; a delete wakes a read on that key
    out_rec, out_del = {}, {}
    i3 = _index(_put(cp, "cfg/z", "z"))
    ta = threading.Thread(target=_blocking_get, args=(cp, f"/v1/kv/cfg/?recurse&index={i3}&wait=10s", out_rec), daemon=True)
    tb = threading.Thread(target=_blocking_get, args=(cp, f"/v1/kv/cfg/z?index={i3}&wait=10s", out_del), daemon=True)
    ta.start()
    tb.start()
    ta.join(0.5)
    assert ta.is_alive() and tb.is_alive(), (out_rec, out_del)
    i4 = _index(_put(cp, "cfg/new", "n"))
    ta.join(5)
    assert not ta.is_alive(), "recursive blocking read did not wake for a new key"
    r = out_rec["r"]
    assert r.status == 200 and _index(r) == i4, r
    assert "cfg/new" in [x["Key"] for x in r.json()], r.json()
    assert tb.is_alive(), f"blocking read on cfg/z woke for cfg/new: {out_del}"
    r = cp.api("DELETE", "/v1/kv/cfg/z")
    assert r.status == 200, r
    tb.join(5)
    assert not tb.is_alive(), "blocking read did not wake when its key was deleted"
    assert out_del["r"].status == 404, out_del["r"]


def _parse_cli_watch(text):
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(" ", 3)
        idx, op, key = int(parts[0]), parts[1], parts[2]
        value = parts[3] if len(parts) > 3 else ""
        out.append((idx, op, key, value if op == "put" else ""))
    return out


def _parse_ndjson(text):
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        value = base64.b64decode(v.get("Value") or "").decode() if v["Event"] == "put" else ""
        out.append((v["ModifyIndex"], v["Event"], v["Key"], value))
    return out


@pytest.mark.timeout(60)
def test_kv_watch_sees_each_change_in_order(run):
    cp = run.control()
    start = _index(_put(cp, "app/seed", "s0"))
    env = _clean_cli_env()
    env["SMESH_CONTROL"] = cp.url
    # both watchers start after `start`, so none of the changes below can be missed by a race
    cli = run.spawn([SMESH_BIN, "kv", "watch", "app/", "--index", start], "kv-watch", env=env,
                    cwd=run.workdir)
    stream = run.spawn(["curl", "-sS", "-N", "--max-time", "50",
                        f"{cp.url}/v1/watch/kv/app/?index={start}"], "kv-stream")

    expected = []

    def put(key, value, cas=None, under=True):
        r = _put(cp, key, value, cas=cas)
        assert r.status == 200, r
        if r.json() is True and under:
            expected.append((_index(r), "put", key, value))
        return r

    def delete(key):
        r = cp.api("DELETE", f"/v1/kv/{key}")
        assert r.status == 200 and r.json() is True, r
        expected.append((_index(r), "delete", key, ""))

    for i in range(10):
        put(f"app/k{i % 3}", f"v{i}")
    put("other/x", "not-watched", under=False)
    put("apple", "not-watched-either", under=False)
    delete("app/k1")
    cur = _entry(cp, "app/k0")["ModifyIndex"]
    assert put("app/k0", "stale-cas", cas=cur - 1).json() is False   # a failed CAS is no change
    put("app/k0", "cas-ok", cas=cur)
    put("app/deep/nested/key", "deep")
    delete("app/seed")
    # CLI writes too
    r = cp.cli("kv", "put", "app/cli", "from-cli")
    assert r.returncode == 0, r
    expected.append((_cli_index(r), "put", "app/cli", "from-cli"))
    indexes = [e[0] for e in expected]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes), expected

    def got(proc, parse):
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited {proc.poll()}: {proc.stderr()[-1000:]}")
        return len(parse(proc.stdout())) >= len(expected)

    wait_until(lambda: got(cli, _parse_cli_watch), 10, interval=0.05, what="`smesh kv watch` output")
    wait_until(lambda: got(stream, _parse_ndjson), 10, interval=0.05, what="HTTP watch stream output")
    # anything extra would arrive with the last event; give it no chance to hide
    assert _parse_cli_watch(cli.stdout()) == expected, cli.stdout()
    assert _parse_ndjson(stream.stdout()) == expected, stream.stdout()

    # the watch keeps going: one more change is seen, still in order
    r = put("app/late", "late")
    wait_until(lambda: len(_parse_cli_watch(cli.stdout())) == len(expected), 5, what="late change (CLI)")
    wait_until(lambda: len(_parse_ndjson(stream.stdout())) == len(expected), 5, what="late change (HTTP)")
    assert _parse_cli_watch(cli.stdout()) == expected
    assert _parse_ndjson(stream.stdout()) == expected
    assert cli.alive()
