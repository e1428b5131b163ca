"""semid: the production loop that keeps Semantic IDs fresh and retrains the ranker that uses them."""
