"""Helpers for tests, benchmarks and users: seeded datasets and brute-force references."""

from .data import brute_force_topk, clustered_vectors, recall_at_k

__all__ = ["brute_force_topk", "clustered_vectors", "recall_at_k"]
