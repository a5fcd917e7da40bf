"""Serving: requests, a paged KV cache, continuous batching over the parallel engine."""
