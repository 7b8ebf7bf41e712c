"""The neural ranker: DCN-v2 + MLP over (user, product, offer/seller) triples of retrieved candidates.

Offline (Spark, Lightning, MLflow)::

    ranking.data.run(cfg, run_dir)       RUN_DIR/ranker_data   lists to learn from / evaluate on (Spark → Parquet)
    ranking.train.run(cfg, run_dir)      RUN_DIR/ranker        state dict + JSON description (+ the towers used)
    ranking.evaluate.run(cfg, run_dir)   RUN_DIR/ranker_eval   NDCG@10 / Recall@10 / MRR vs retrieval order, bootstrap CIs

Serving (no Lightning, no Spark)::

    ranking.scorer.Ranker.load(RUN_DIR / "ranker", RUN_DIR).rank(user_id, candidates, context)
    ranking.service.create_app(ranker, cfg, retrieval_client)   /v1/rank, /v1/recommend, best-sellers
    ranking.service.serve(cfg, run_dir, retrieval_url)

Feature code shared by training data and serving lives in :mod:`ranking.features`; modules are
imported explicitly so importing the package stays cheap.
"""
