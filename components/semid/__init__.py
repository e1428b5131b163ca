"""The Semantic ID family: CU embeddings, the RQ-VAE and its training stage, the SemID store and backfill,
publishing."""
