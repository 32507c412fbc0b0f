"""``make demo``: the seed flow of a TPP on a fresh machine, step by step (not part of the product)."""
