"""Export, indexes, bundles and batch recommend on the tiny prepared artifact with an untrained model."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.artifacts import read_manifest, write_manifest
from retrieval import bundle as bundle_mod
from retrieval import export, faiss_index, recommend
from retrieval.bundle import BundleError, load_bundle
from retrieval.faiss_index import MetricMismatchError, RecallFloorError
from retrieval.retriever import Filters, Retriever
from tests.test_retrieval_support import N_PRODUCTS, N_SELLERS, N_USERS, make_run, tiny_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    cfg = tiny_cfg()
    prep, run = make_run(tmp, cfg)
    exp = export.run(cfg, run)
    idx = faiss_index.run(cfg, run)
    bun = bundle_mod.build(cfg, run)
    return cfg, prep, run, exp, idx, bun


def test_export_counts_manifest_and_exact_vectors(built) -> None:
    cfg, prep, run, exp, _, _ = built
    assert exp["counts"] == {"products": N_PRODUCTS, "sellers": N_SELLERS, "users": N_USERS}
    assert exp["dim"] == 16 and exp["normalisation"] == "l2" and exp["metric"] == "inner_product"
    man = read_manifest(run / "export", verify=True)
    model_json = json.loads((run / "model" / "model.json").read_text())
    assert man["vocab_fingerprint"] == model_json["vocab_fingerprint"]
    assert man["model_version"] and man["model_created_at"] == read_manifest(run / "model")["created_at"]
    for kind in ("products", "sellers", "users"):
        assert f"{kind}.parquet" in man["files"] and f"{kind}.npy" in man["files"]
        t = pq.read_table(run / "export" / f"{kind}.parquet")
        assert t.column_names == ["id", "index", "vector"] and t.schema.field("vector").type == pa.list_(pa.float32())
        vec = np.load(run / "export" / f"{kind}.npy", allow_pickle=False)
        assert vec.dtype == np.float32 and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
        assert np.allclose(np.asarray(t["vector"].to_pylist(), np.float32), vec)
    # the exported vectors are the towers' own
    import torch

    from towers.checkpoint import load_towers

    model, _ = load_towers(run / "model")
    with torch.no_grad():
        pv = model.product_vectors(torch.arange(1, 6)).numpy()
    assert np.allclose(np.load(run / "export" / "products.npy")[:5], pv, atol=1e-6)
    users = pq.read_table(run / "export" / "users.parquet", columns=["id", "index"])
    assert users["id"][0].as_py() == "u1" and users["index"][0].as_py() == 1


def test_index_manifest_records_recall(built) -> None:
    _, _, run, _, idx, _ = built
    for kind in ("products", "sellers"):
        info = idx["indexes"][kind]
        assert info["factory"] == "Flat" and info["recall"] == 1.0 and info["recall_k"] <= 100
        assert faiss.read_index(str(run / "index" / f"{kind}.faiss")).metric_type == faiss.METRIC_INNER_PRODUCT


def test_index_factories_tuning_and_failures() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(3000, 100, replace=False)] + 0.1 * rng.normal(size=(100, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert faiss_index.choose_factory(10_000, 64) == "Flat"
    assert faiss_index.choose_factory(60_000, 64) == "IVF1024,PQ32x4fs,RFlat"
    assert faiss_index.choose_factory(1_000_000, 64) == "IVF4096,PQ32x4fs,RFlat"
    assert faiss_index.choose_factory(4_000_000, 64) == "IVF8192,PQ32x4fs,RFlat"
    assert faiss_index.adapt_factory("IVF4096,PQ32x4fs,RFlat", 3000) == "IVF76,PQ32x4fs,RFlat"
    cfg = tiny_cfg("retrieval.ivf_nprobe=1", "retrieval.recall_k=50").retrieval
    index, info = faiss_index.build_tuned(x, q, "IVF4096,Flat", cfg)
    assert info["factory"] == "IVF76,Flat" and info["recall"] >= 0.95
    assert info["latency_ms_p50"] > 0 and info["exact_latency_ms_p50"] > 0 and info["latency_queries"] > 0
    assert info["settings"]["nprobe"] > 1 and len(info["tuning"]) > 1  # nprobe was raised to meet the floor
    _, info = faiss_index.build_tuned(x, q, "HNSW32", tiny_cfg("retrieval.hnsw_ef_search=16").retrieval)
    assert info["recall"] >= 0.95
    with pytest.raises(RecallFloorError, match="recall@100 .* under retrieval.recall_floor"):
        faiss_index.build_tuned(x, q, "IVF16,PQ2x4fs", tiny_cfg().retrieval)  # far too lossy, no refine
    with pytest.raises(MetricMismatchError, match="inner product"):
        faiss_index.build_index(x, "Flat", metric="l2")
    with pytest.raises(faiss_index.IndexBuildError, match="not a valid FAISS factory"):
        faiss_index.build_index(x, "NoSuchIndex")


def test_bundle_layout_current_and_load(built) -> None:
    cfg, _, run, _, _, bun = built
    path = run / "bundles" / bun["version"]
    assert (run / "bundles" / "CURRENT").read_text().strip() == bun["version"]
    for rel in ("export/products.npy", "index/products.faiss", "vocab/users.parquet", "vocab/categories.parquet",
                "model/towers.pt", "model/model.json", "serving/offers.parquet", "serving/histories.parquet",
                "serving/popularity.parquet"):
        assert rel in bun["files"], rel
    b = load_bundle(run)  # a run dir resolves to bundles/CURRENT
    assert b.version == bun["version"] and b.path == path and b.model is not None
    assert len(b.product_ids) == N_PRODUCTS and b.user_vectors.shape == (N_USERS, 16)
    r = Retriever(b, cfg)
    # bought items (purchase events of histories/full) are excluded; views are not
    res = r.recommend_products(["u1"], N_PRODUCTS, Filters())[0]
    ids = {c.product_id for c in res.candidates}
    hist = pq.read_table(run / "bundles" / bun["version"] / "serving" / "histories.parquet").to_pylist()[0]
    bought = {f"p{p}" for p, t in zip(hist["products"], hist["types"], strict=True) if t == 2}
    viewed = {f"p{p}" for p, t in zip(hist["products"], hist["types"], strict=True) if t == 0} - bought
    assert bought and not (ids & bought) and viewed <= ids
    assert len(res.candidates) == N_PRODUCTS - len(bought)
    # a user tower query with recent products differs from the exported vector and is unit length
    v0, _ = r.user_vectors(["u1"])
    v1, known = r.user_vectors(["u1", "stranger"], recent_products=[["p3", "p4"], ["p5", "nope"]])
    assert known.all() and not np.allclose(v0[0], v1[0]) and np.allclose(np.linalg.norm(v1, axis=1), 1, atol=1e-5)


def _copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bundle_tamper_and_mismatch_are_refused(built, tmp_path) -> None:
    _, _, run, _, _, bun = built
    src = run / "bundles" / bun["version"]
    bad = _copy_bundle(src, tmp_path / "tampered")
    arr = np.load(bad / "export" / "products.npy")
    (bad / "export" / "products.npy").unlink()  # hard links: replace, never write through
    arr[0, 0] += 0.5
    np.save(bad / "export" / "products.npy", arr)
    with pytest.raises(BundleError, match="checksum mismatch for export/products.npy"):
        load_bundle(bad)
    mis = _copy_bundle(src, tmp_path / "mismatch")
    desc = json.loads((mis / "model" / "model.json").read_text())
    desc["vocab_fingerprint"] = "0123456789abcdef"
    (mis / "model" / "model.json").unlink()
    (mis / "model" / "model.json").write_text(json.dumps(desc))
    m = json.loads((mis / "manifest.json").read_text())
    m.pop("files")
    write_manifest(mis, m)  # checksums are valid again: only the fingerprint check can catch it
    with pytest.raises(BundleError, match="vocabulary fingerprint mismatch"):
        load_bundle(mis)
    l2 = _copy_bundle(src, tmp_path / "l2")
    x = np.load(l2 / "export" / "products.npy")
    ix = faiss.IndexFlatL2(x.shape[1])
    ix.add(x)
    (l2 / "index" / "products.faiss").unlink()
    faiss.write_index(ix, str(l2 / "index" / "products.faiss"))
    m = json.loads((l2 / "manifest.json").read_text())
    m.pop("files")
    write_manifest(l2, m)
    with pytest.raises(BundleError, match="index metric is 'l2'"):
        load_bundle(l2)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nothing")
    old = _copy_bundle(src, tmp_path / "format1")
    m = json.loads((old / "manifest.json").read_text())
    m.pop("files")
    m["format"] = 1
    write_manifest(old, m)
    with pytest.raises(BundleError, match="format 1 predates the product score offsets"):
        load_bundle(old)


def test_popularity_prior_reaches_export_index_and_recommendations(tmp_path) -> None:
    """A model with a popularity prior: export writes its offsets, the product index holds them as one
    more dimension, and recommendations rank by cos + offset exactly as the model scores."""
    import torch

    from recsys.artifacts import atomic_artifact
    from towers.checkpoint import load_towers, save_towers

    cfg = tiny_cfg()
    _, run = make_run(tmp_path, cfg)
    model, desc = load_towers(run / "model")
    n = model.shape.n_products
    model.set_popularity(torch.log(torch.arange(1, n + 1, dtype=torch.float32)))  # later products more popular
    model.set_popularity_prior(2.0)
    extra = {k: v for k, v in desc.items() if k != "shape"}
    with atomic_artifact(run / "model", {"stage": "train", **extra}) as tmp:
        save_towers(model, tmp, extra)
    exp = export.run(cfg, run)
    assert exp["popularity_prior"] == 2.0
    idx = np.load(run / "export" / "products_idx.npy")
    off = np.load(run / "export" / "products_offsets.npy")
    with torch.no_grad():
        want_off = model.product_offsets(torch.from_numpy(idx)).numpy()
    assert np.allclose(off, want_off) and off.max() <= 0 and off.min() < -0.5  # strong enough to reorder
    faiss_index.run(cfg, run)
    assert faiss.read_index(str(run / "index" / "products.faiss")).d == 16 + 1
    bundle_mod.build(cfg, run)
    b = load_bundle(run)
    assert np.array_equal(b.product_offsets, off)
    r = Retriever(b, cfg)
    uvec = b.user_vectors[0]
    res = r.recommend_products(["u1"], 10, Filters(exclude_bought=False))[0]
    scores = b.product_vectors @ uvec + off
    want = [f"p{int(i)}" for i in idx[np.argsort(-scores, kind="stable")[:10]]]
    assert [c.product_id for c in res.candidates] == want
    assert np.allclose([c.score for c in res.candidates], np.sort(scores)[::-1][:10], atol=1e-5)
    cos_only = [f"p{int(i)}" for i in idx[np.argsort(-(b.product_vectors @ uvec), kind="stable")[:10]]]
    assert cos_only != want


def test_recommend_on_txt_and_csv_flags_unknown_users(built, tmp_path) -> None:
    cfg, _, run, _, _, bun = built
    (tmp_path / "users.txt").write_text("u1\nu2\n\nghost\nu3\n")
    out = recommend.run(cfg, run, tmp_path / "users.txt", 5, tmp_path / "recs.parquet")
    assert out["users"] == 4 and out["fallback_users"] == 1 and out["rows"] == 20
    assert out["bundle_version"] == bun["version"]
    t = pq.read_table(tmp_path / "recs.parquet")
    assert t.column_names == ["user_id", "product_id", "rank", "score", "seller_id", "fallback"]
    rows = t.to_pylist()
    assert {r["user_id"] for r in rows if r["fallback"]} == {"ghost"}
    assert [r["rank"] for r in rows if r["user_id"] == "u1"] == [1, 2, 3, 4, 5]
    r = Retriever(load_bundle(run), cfg)
    api = [c.product_id for c in r.recommend_products(["u2"], 5)[0].candidates]
    assert [x["product_id"] for x in rows if x["user_id"] == "u2"] == api  # same code path as the library
    (tmp_path / "users.csv").write_text("user_id,segment\nu4,a\nnobody,b\n")
    out = recommend.run(cfg, run, tmp_path / "users.csv", 3, tmp_path / "sellers.parquet", what="sellers")
    t = pq.read_table(tmp_path / "sellers.parquet")
    assert t.column_names == ["user_id", "seller_id", "rank", "score", "fallback"]
    assert out["rows"] == 6 and out["fallback_users"] == 1
    pq.write_table(pa.table({"user_id": ["u5", "u6"]}), tmp_path / "users.parquet")
    assert recommend.run(cfg, run, tmp_path / "users.parquet", 2, tmp_path / "p.parquet")["rows"] == 4
    (tmp_path / "bad.csv").write_text("id\nu1\n")
    with pytest.raises(Exception, match="no 'user_id' column"):
        recommend.run(cfg, run, tmp_path / "bad.csv", 2, tmp_path / "x.parquet")


def test_recommend_builds_export_index_and_bundle_when_missing(tmp_path) -> None:
    cfg = tiny_cfg()
    _, run = make_run(tmp_path, cfg, seed=1)
    (tmp_path / "u.txt").write_text("u1\nu9\n")
    out = recommend.run(cfg, run, tmp_path / "u.txt", 4, tmp_path / "o.parquet")
    assert out["rows"] == 8 and out["fallback_users"] == 0
    assert (run / "export" / "manifest.json").exists() and (run / "index" / "manifest.json").exists()
    assert bundle_mod.current_bundle_path(run) is not None
