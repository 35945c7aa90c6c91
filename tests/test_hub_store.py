"""HubStore: schema versioning, transactions, concurrent writers, array files."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from anyclass.hub.graph import Node, SemanticGraph
from anyclass.hub.store import SCHEMA_VERSION, HubError, HubSchemaError, HubStore


def _add(store: HubStore, spec: str, n_heads: int = 3, params: int = 2_000_000) -> int:
    return store.add_model(spec, f"id:{spec}", "w" * 64, "expert",
                           [f"h{i}" for i in range(n_heads)],
                           ["dog.n.01"] + [None] * (n_heads - 1), num_params=params)


def _tiny_graph() -> SemanticGraph:
    return SemanticGraph([Node("a.n.01", "n00000001", ["a"], "root", [], ["b.n.01"]),
                          Node("b.n.01", "n00000002", ["b"], "child", ["a.n.01"], [])])


def test_models_heads_roundtrip(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    mid = _add(s, "timm:x@random", 3)
    assert _add(s, "timm:x@random", 3) == mid              # same spec + weights: same id
    m = s.model("timm:x@random")
    assert (m.id, m.kind, m.num_params, m.cost) == (mid, "expert", 2_000_000, 2.0)
    assert s.model(mid).spec == "timm:x@random" and s.model(str(mid)).id == mid
    hs = s.heads(mid)
    assert [h.name for h in hs] == ["h0", "h1", "h2"]
    assert [h.synset for h in hs] == ["dog.n.01", None, None]
    assert [h.how for h in hs] == ["model", "none", "none"]
    with pytest.raises(HubError, match="already in the hub with other weights"):
        s.add_model("timm:x@random", "id", "v" * 64, "expert", ["a"])
    with pytest.raises(HubError, match="no model 'nope'"):
        s.model("nope")
    with pytest.raises(HubError, match="kind 'big'"):
        s.add_model("y", "id", "w", "big", ["a"])
    s.update_model_meta(mid, ms_per_image=1.5)
    assert s.model(mid).meta == {"ms_per_image": 1.5}
    assert s.head_synsets() == ["dog.n.01"]


def test_failed_transaction_leaves_nothing(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    with pytest.raises(HubError):   # heads/synsets length mismatch: raised before writing
        s.add_model("m", "id", "w", "expert", ["a", "b"], ["x.n.01"])
    with pytest.raises(RuntimeError):
        with s.transaction() as t:
            t.execute("INSERT INTO models (spec, identity, weights_hash, kind, added_at) "
                      "VALUES ('half', 'i', 'w', 'expert', 0)")
            raise RuntimeError("crash mid-write")
    assert s.models() == []


def test_schema_version_errors(tmp_path):
    p = tmp_path / "hub.sqlite"
    HubStore(p).close()
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    c.commit()
    c.close()
    with pytest.raises(HubSchemaError) as e:
        HubStore(p)
    msg = str(e.value)
    assert "\n" not in msg and "schema version 0" in msg and f"version {SCHEMA_VERSION}" in msg
    assert "anyclass hub init" in msg
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    c.commit()
    c.close()
    with pytest.raises(HubSchemaError, match="newer than this anyclass reads.*upgrade anyclass"):
        HubStore(p)
    other = tmp_path / "other.sqlite"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(HubSchemaError, match="not an anyclass hub"):
        HubStore(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(HubSchemaError, match="not an anyclass hub"):
        HubStore(junk)


def test_schema_migration_applied(tmp_path, monkeypatch):
    import anyclass.hub.store as st
    p = tmp_path / "hub.sqlite"
    HubStore(p).close()
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION - 1),))
    c.execute("ALTER TABLE models RENAME TO models_old")
    c.commit()
    c.close()

    def up(conn):
        conn.execute("ALTER TABLE models_old RENAME TO models")
    monkeypatch.setitem(st.MIGRATIONS, SCHEMA_VERSION - 1, up)
    with pytest.raises(HubSchemaError, match="anyclass hub migrate"):
        HubStore(p)
    s = HubStore(p, migrate=True)
    assert s.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert s.models() == []


def _writer(path: str, w: int, n: int) -> None:
    s = HubStore(path)
    for i in range(n):
        _add(s, f"spec-{w}-{i}", 2)
        s.set_meta(f"k{w}-{i}", "v")
    s.close()


def test_concurrent_writers_lose_nothing(tmp_path):
    p = tmp_path / "hub.sqlite"
    HubStore(p).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(p), w, 25)) for w in range(4)]
    for q in procs:
        q.start()
    for q in procs:
        q.join(60)
        assert q.exitcode == 0
    s = HubStore(p)
    specs = {m.spec for m in s.models()}
    assert specs == {f"spec-{w}-{i}" for w in range(4) for i in range(25)}
    n_heads = s.conn.execute("SELECT COUNT(*) FROM heads").fetchone()[0]
    assert n_heads == 200
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_graph_roundtrip_and_current(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    with pytest.raises(HubError, match="no graph yet"):
        s.load_graph()
    g = _tiny_graph()
    g.images = {"b.n.01": ["/x/1.png"]}
    h = s.save_graph(g)
    g2 = s.load_graph()
    assert s.graph_hash() == h == g2.hash()
    assert g2.order == ["a.n.01", "b.n.01"] and g2.images == {"b.n.01": ["/x/1.png"]}


def test_arrays_atomic_checksummed(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    digest = s.write_array("x/a.npy", a)
    assert np.array_equal(s.read_array("x/a.npy", digest), a)
    assert not list((s.arrays_dir / "x").glob("*.tmp"))
    f = s.arrays_dir / "x" / "a.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert s.read_array("x/a.npy", digest) is None          # corrupt: detected
    f.unlink()
    assert s.read_array("x/a.npy", digest) is None          # missing: detected


def test_shard_claims_and_corrupt_shard_reset(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    mid = _add(s, "m", 2)
    plan = s.plan_shards(mid, "g1", n_nodes=10, shard_size=4)
    assert [(p.start, p.stop) for p in plan] == [(0, 4), (4, 8), (8, 10)]
    assert len(s.plan_shards(mid, "g1", n_nodes=10, shard_size=3)) == 3   # plan kept
    a = s.claim_shard(mid, "g1", "me")
    b = s.claim_shard(mid, "g1", "other")
    assert (a.shard, b.shard) == (0, 1)
    assert s.complete_shard(a, np.zeros((2, 2, 4)), "me")
    assert not s.complete_shard(b, np.zeros((2, 2, 4)), "me")   # not my claim: dropped
    assert len(list(s.arrays_dir.rglob("*.npy"))) == 1          # ... and its file removed
    c = s.claim_shard(mid, "g1", "me")
    assert c.shard == 2
    assert s.claim_shard(mid, "g1", "me") is None          # b, c are held by live claims
    # a claim whose heartbeat is old is taken over
    s.conn.execute("UPDATE shards SET heartbeat=0, pid=NULL WHERE shard=1")
    assert s.claim_shard(mid, "g1", "me", stale_after=60).shard == 1
    # a claim of a dead process on this host is taken over at once
    s.conn.execute("UPDATE shards SET owner='ghost', pid=999999999 WHERE shard=2")
    assert s.claim_shard(mid, "g1", "me").shard == 2
    done = s.shards(mid, "g1")[0]
    (s.arrays_dir / done.file).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"shard\(s\) \[0\] had a missing or corrupt"):
        assert s.verify_shards(mid, "g1") == [0]
    assert s.shards(mid, "g1")[0].status == "pending"


def test_labels_assembled(tmp_path):
    s = HubStore(tmp_path / "hub.sqlite")
    g = _tiny_graph()
    h = s.save_graph(g)
    m1, m2, m3 = _add(s, "m1", 2, 1_000_000), _add(s, "m2", 3, 5_000_000), _add(s, "m3", 1)
    r = np.random.default_rng(0)
    mats = {m1: r.random((2, 2, 2)), m2: r.random((2, 3, 2))}
    for m, a in mats.items():
        s.save_label_matrix(m, h, "propagated", a)
        s.save_label_matrix(m, h, "raw", a / 2)
    with pytest.warns(UserWarning, match="not labelled on the current graph, left out: m3"):
        lab = s.labels()
    assert lab.nodes == ["a.n.01", "b.n.01"]
    assert lab.heads == [(m1, 0), (m1, 1), (m2, 0), (m2, 1), (m2, 2)]
    assert lab.scores.dtype == np.float32 and lab.scores.shape == (5, 2)
    np.testing.assert_allclose(lab.scores, np.concatenate([mats[m1][0], mats[m2][0]]), 1e-6)
    assert lab.model_cost == {m1: 1.0, m2: 5.0}
    with pytest.warns(UserWarning):
        top = s.labels(propagated=False, metric="top1")
    np.testing.assert_allclose(top.scores, np.concatenate([mats[m1][1], mats[m2][1]]) / 2,
                               1e-6)
    np.testing.assert_allclose(s.label_matrix(m2), mats[m2][0], 1e-6)
    assert s.label_matrix(m3) is None


def test_expert_with_unmappable_head_names_is_kept_and_reported(tmp_path):
    from types import SimpleNamespace
    s = HubStore(tmp_path / "hub.sqlite")
    ex = SimpleNamespace(head_names=["golden retriever", "qwxzvy", "zzkrpt blorf"],
                         head_synsets=None, identity="id:odd", weights_hash="e" * 64,
                         num_params=1000)
    with pytest.warns(UserWarning, match=r"2 of 3 head name\(s\) map to no WordNet synset: "
                                         r"qwxzvy, zzkrpt blorf"):
        mid = s.add_expert("timm:odd@random", expert=ex)
    hs = s.heads(mid)                               # every head kept, in order
    assert [h.name for h in hs] == ex.head_names
    assert hs[0].synset == "golden_retriever.n.01"
    assert hs[1].synset is None and hs[2].synset is None
