"""Model labelling: numbers vs an independent computation on a fake expert, propagation,
resume after a crash, two labellers on one model, corrupt shards, and the Ray path."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anyclass.hub.graph import Node, SemanticGraph
from anyclass.hub.label import (DOWN_DISCOUNT, UP_DISCOUNT, label_models, propagate,
                                score_nodes)
from anyclass.hub.store import HubError, HubStore

N_HEADS = 4


class FakeExpert:
    """Logits = fixed random linear map of the 4x4 mean-pooled image (deterministic)."""
    device = torch.device("cpu")
    weights_hash = "f" * 64
    num_params = 1234

    def __init__(self, spec: str = "fake:0", fail_after: int | None = None,
                 sleep: float = 0.0, log: str | None = None) -> None:
        self.identity = spec
        seed = int(spec.split(":")[1])
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(3 * 4 * 4, N_HEADS, generator=g) * 3
        self.head_names = [f"h{i}" for i in range(N_HEADS)]
        self.head_synsets = ["b.n.01", None, "a.n.01", None]
        self.calls, self.fail_after, self.sleep, self.log = 0, fail_after, sleep, log

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img.convert("RGB").resize((4, 4), Image.BILINEAR), np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()

    def preprocess_id(self) -> str:
        return "fake4"

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        if self.log:                      # one line per forward pass, from any process
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {len(x)}\n")
        if self.sleep:
            time.sleep(self.sleep)
        return (x.flatten(1) - 0.5) @ self.W


class Factory:
    """Picklable expert factory (Ray workers, forked processes); counts builds."""

    def __init__(self, **kw) -> None:
        self.kw = kw

    def __call__(self, spec: str) -> FakeExpert:
        return FakeExpert(spec, **self.kw)


#   a ── b ── d          c has two parents (a DAG); e has no images
#    \── c ──/ \── e
def _graph(img_dir) -> SemanticGraph:
    nodes = [Node("a.n.01", "n1", ["a"], "", [], ["b.n.01", "c.n.01"]),
             Node("b.n.01", "n2", ["b"], "", ["a.n.01"], ["d.n.01"]),
             Node("c.n.01", "n3", ["c"], "", ["a.n.01"], ["d.n.01"]),
             Node("d.n.01", "n4", ["d"], "", ["b.n.01", "c.n.01"], ["e.n.01"]),
             Node("e.n.01", "n5", ["e"], "", ["d.n.01"], [])]
    rng = np.random.default_rng(0)
    direct = {}
    for n in ("b.n.01", "c.n.01", "d.n.01"):
        direct[n] = []
        for k in range(5):
            p = img_dir / f"{n}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(p)
            direct[n].append(str(p))
    g = SemanticGraph(nodes)
    g.attach_images(direct, per_node=6, seed=0)
    return g


@pytest.fixture
def hub(tmp_path):
    (tmp_path / "img").mkdir()
    store = HubStore(tmp_path / "hub.sqlite")
    g = _graph(tmp_path / "img")
    store.save_graph(g)
    ids = []
    for seed in (1, 2):
        e = FakeExpert(f"fake:{seed}")
        ids.append(store.add_model(e.identity, e.identity, e.weights_hash, "expert",
                                   e.head_names, e.head_synsets, num_params=e.num_params))
    return store, g, ids


def _independent_raw(expert: FakeExpert, graph: SemanticGraph) -> np.ndarray:
    """prob/top1 per node by a per-image loop: the reference for score_nodes."""
    out = np.full((2, N_HEADS, len(graph)), np.nan, np.float32)
    for v, name in enumerate(graph.order):
        imgs = graph.images.get(name, [])
        if not imgs:
            continue
        ps = []
        for p in imgs:
            logit = expert.predict_logits(expert.preprocess(Image.open(p))[None])[0].double()
            ps.append(torch.softmax(logit, 0).numpy())
        ps = np.array(ps)
        out[0, :, v] = ps.mean(0)
        out[1, :, v] = np.bincount(ps.argmax(1), minlength=N_HEADS) / len(ps)
    return out


def _independent_propagate(raw: np.ndarray, g: SemanticGraph, syn) -> np.ndarray:
    """The propagation formulas written out node by node with explicit recursion."""
    own = np.nan_to_num(raw, nan=0.0)
    H = raw.shape[0]

    def up(h, v):
        kids = g.nodes[v].children
        best = max((up(h, c) for c in kids), default=0.0)
        return max(own[h, g.index[v]], UP_DISCOUNT * best)

    def down(h, v):
        u = up(h, v)
        s = syn[h]
        if s is None or (v != s and v not in g.descendants(s)) or v == s:
            return u
        return max(u, DOWN_DISCOUNT * max(down(h, p) for p in g.nodes[v].parents))
    return np.array([[down(h, v) for v in g.order] for h in range(H)], np.float32)


def test_graph_fixture_images(hub):
    _, g, _ = hub
    assert g.order == ["a.n.01", "b.n.01", "c.n.01", "d.n.01", "e.n.01"]
    assert "e.n.01" not in g.images
    assert set(g.images["a.n.01"]) <= set(sum((g.images[n] for n in "bcd" and
                                               ["b.n.01", "c.n.01", "d.n.01"]), []))
    assert len(g.images["a.n.01"]) == 6 and len(g.images["d.n.01"]) == 5
    assert g.images["b.n.01"][:3] == [g.images["d.n.01"][0], *g.images["b.n.01"][1:3]] or \
        g.images["b.n.01"][0].endswith("b.n.01_0.png")     # own images first


def test_labels_match_independent_computation(hub):
    store, g, ids = hub
    rep = label_models(store, shard_size=2, progress=False, expert_factory=Factory())
    assert sorted(rep.assembled) == ids and rep.computed == {ids[0]: 3, ids[1]: 3}
    for mid, seed in zip(ids, (1, 2)):
        e = FakeExpert(f"fake:{seed}")
        ref = _independent_raw(e, g)
        raw = np.stack([store.label_matrix(mid, propagated=False, metric=m)
                        for m in ("prob", "top1")])
        np.testing.assert_allclose(raw, ref, atol=1e-5)
        assert np.isnan(raw[:, :, g.index["e.n.01"]]).all()
        for k, metric in enumerate(("prob", "top1")):
            want = _independent_propagate(ref[k], g, e.head_synsets)
            np.testing.assert_allclose(store.label_matrix(mid, metric=metric), want, atol=1e-5)
    lab = store.labels()
    assert lab.scores.shape == (8, 5) and not np.isnan(lab.scores).any()
    assert lab.heads[:4] == [(ids[0], i) for i in range(4)]
    # head 0 (synset b) inherits downward into e: 0.8 × its score on d (at least)
    P = store.label_matrix(ids[0])
    assert P[0, 4] == pytest.approx(max(DOWN_DISCOUNT * P[0, 3], 0.0), abs=1e-6)
    # head 1 (no synset) gets nothing on the image-less e
    assert P[1, 4] == 0.0
    # second call: everything labelled, nothing recomputed
    rep2 = label_models(store, progress=False, expert_factory=Factory())
    assert rep2.computed == {} and sorted(rep2.skipped) == ids


def test_propagate_two_parents_and_discounts():
    nodes = [Node("r", "n0", [], "", [], ["x", "y"]), Node("x", "n1", [], "", ["r"], ["z"]),
             Node("y", "n2", [], "", ["r"], ["z"]), Node("z", "n3", [], "", ["x", "y"], [])]
    g = SemanticGraph(nodes)
    raw = np.array([[np.nan, 0.1, np.nan, 0.9],     # head on z only
                    [0.6, np.nan, np.nan, np.nan]], np.float32)   # head trained on r
    P = propagate(raw, g, ["z", "r"], up=0.5, down=0.8)
    i = g.index
    assert P[0, i["z"]] == pytest.approx(0.9)
    assert P[0, i["x"]] == pytest.approx(0.45) and P[0, i["y"]] == pytest.approx(0.45)
    assert P[0, i["r"]] == pytest.approx(0.225)
    assert P[1, i["x"]] == pytest.approx(0.48) and P[1, i["z"]] == pytest.approx(0.384)


def test_resume_after_crash(hub, tmp_path):
    store, g, ids = hub
    with pytest.raises(KeyboardInterrupt):
        # the expert dies during its 2nd shard (1 batch per shard)
        label_models(store, model_ids=[ids[0]], shard_size=2, progress=False,
                     expert_factory=Factory(fail_after=1))
    st = [s.status for s in store.shards(ids[0], g.hash())]
    assert st == ["done", "pending", "pending"]          # claim released, first shard kept
    rep = label_models(store, model_ids=[ids[0]], shard_size=2, progress=False,
                       expert_factory=Factory())
    assert rep.computed == {ids[0]: 2} and rep.assembled == [ids[0]]
    ref = _independent_raw(FakeExpert("fake:1"), g)
    np.testing.assert_allclose(store.label_matrix(ids[0], propagated=False), ref[0], atol=1e-5)


def test_killed_labeller_is_taken_over(hub):
    """A labeller killed with SIGKILL leaves a 'running' claim: the next run takes it over
    (its pid is dead) and computes it."""
    store, g, ids = hub
    ctx = mp.get_context("spawn")   # fork + torch's OpenMP pool can hang the child
    p = ctx.Process(target=_victim, args=(str(store.path), ids[0]))
    p.start()
    for _ in range(600):
        if any(s.status == "running" for s in store.shards(ids[0], g.hash())):
            break
        time.sleep(0.05)
    os.kill(p.pid, 9)
    p.join()
    assert any(s.status == "running" for s in store.shards(ids[0], g.hash()))
    rep = label_models(store, model_ids=[ids[0]], progress=False, expert_factory=Factory())
    assert rep.assembled == [ids[0]] and rep.computed[ids[0]] == 3


def _victim(path, mid):
    label_models(HubStore(path), model_ids=[mid], shard_size=2, progress=False,
                 expert_factory=Factory(sleep=30))


def _labeller(path, mid, q, log):
    rep = label_models(HubStore(path), model_ids=[mid], shard_size=1, progress=False,
                       expert_factory=Factory(sleep=0.3, log=log))
    q.put(rep.computed.get(mid, 0))


def test_two_processes_share_one_model(hub, tmp_path):
    store, g, ids = hub
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    log = tmp_path / "forward.log"
    procs = [ctx.Process(target=_labeller, args=(str(store.path), ids[1], q, str(log)))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    counts = [q.get(timeout=5) for _ in procs]
    assert sum(counts) == len(g)                     # 5 shards of one node: none lost
    # one forward pass per shard with images (a-d; e has none): none computed twice
    assert len(log.read_text().splitlines()) == 4
    ref = _independent_raw(FakeExpert("fake:2"), g)
    np.testing.assert_allclose(store.label_matrix(ids[1], propagated=False), ref[0], atol=1e-5)


def test_corrupt_shard_recomputed(hub):
    store, g, ids = hub
    label_models(store, model_ids=[ids[0]], shard_size=2, progress=False,
                 expert_factory=Factory())
    s0 = store.shards(ids[0], g.hash())[1]
    (store.arrays_dir / s0.file).write_bytes(b"\x93NUMPY truncated")
    store.conn.execute("DELETE FROM label_matrices")
    with pytest.warns(UserWarning, match=r"shard\(s\) \[1\]"):
        rep = label_models(store, model_ids=[ids[0]], progress=False, expert_factory=Factory())
    assert rep.computed == {ids[0]: 1}
    ref = _independent_raw(FakeExpert("fake:1"), g)
    np.testing.assert_allclose(store.label_matrix(ids[0], propagated=False), ref[0], atol=1e-5)


def test_bad_image_skipped_and_weights_check(hub):
    store, g, ids = hub
    bad = g.images["d.n.01"][0]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    e = FakeExpert("fake:1")
    with pytest.warns(UserWarning, match="skipped .*d.n.01_0.png"):
        arr, n = score_nodes(e, [[bad], [bad, g.images["d.n.01"][1]]])
    assert n == 1 and np.isnan(arr[:, :, 0]).all() and not np.isnan(arr[:, :, 1]).any()

    class Other(Factory):
        def __call__(self, spec):
            x = FakeExpert(spec)
            x.weights_hash = "0" * 64
            return x
    with pytest.raises(HubError, match="other weights"):
        label_models(store, model_ids=[ids[0]], progress=False, expert_factory=Other())
    with pytest.raises(HubError, match=r"no expert model\(s\) \[99\]"):
        label_models(store, model_ids=[99], progress=False, expert_factory=Factory())


def test_ray_matches_in_process(hub, tmp_path):
    ray = pytest.importorskip("ray")
    store, g, ids = hub
    label_models(store, model_ids=[ids[0]], shard_size=2, progress=False,
                 expert_factory=Factory())
    local = store.label_matrix(ids[0], propagated=False)
    store.conn.execute("DELETE FROM label_matrices")
    store.conn.execute("DELETE FROM shards")
    import ray.cloudpickle as cp
    cp.register_pickle_by_value(sys.modules[__name__])
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # pragma: no cover - machine-specific
        pytest.skip(f"a local Ray cluster cannot start here: {e}")
    try:
        rep = label_models(store, model_ids=[ids[0]], shard_size=2, progress=False,
                           expert_factory=Factory(), ray_address="auto")
    finally:
        ray.shutdown()
        cp.unregister_pickle_by_value(sys.modules[__name__])
    assert rep.computed == {ids[0]: 3} and rep.assembled == [ids[0]]
    np.testing.assert_array_equal(store.label_matrix(ids[0], propagated=False), local)


@pytest.mark.slow
def test_world_expert_end_to_end(mini_world, tmp_path):
    """A real offline-world expert: add by spec (heads carry synsets), graph from its heads,
    world images, label; each head scores higher on its own node than elsewhere."""
    from anyclass.hub.graph import build_graph
    from anyclass.world.experts import ensure_world_experts
    spec = next(s for s in ensure_world_experts(mini_world, progress=False) if "food" in s)
    store = HubStore(tmp_path / "hub.sqlite")
    mid = store.add_expert(spec)
    heads = store.heads(mid)
    assert heads and all(h.synset for h in heads)
    g = build_graph(store.head_synsets(), descendant_depth=0)
    g.attach_world_images(mini_world, per_node=4, per_concept=2, domains=("colour",))
    store.save_graph(g)
    rep = label_models(store, progress=False)
    assert rep.assembled == [mid]
    lab = store.labels(propagated=False)
    own = np.array([lab.scores[r, g.index[g.canonical(s)]] for r, s in enumerate(lab.head_synsets)])
    assert np.nanmean(own) > 2 * np.nanmean(lab.scores)
