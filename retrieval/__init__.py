"""Serving-side retrieval: export of tower embeddings, FAISS indexes, versioned bundles, the
:class:`~retrieval.retriever.Retriever` library, batch ``recommend``, the HTTP API and its client.

Nothing in this package imports PyTorch Lightning (a test enforces it); modules are imported
explicitly (``from retrieval.retriever import Retriever``) so importing the package stays cheap.
"""
