"""Reusable test fixtures: random KJT batches, plain-torch references, 2-rank spawning."""
