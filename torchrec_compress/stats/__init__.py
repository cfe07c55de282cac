"""Streaming id-frequency statistics (exact for small vocabularies, count-min sketch + heavy hitters for large)."""
from .frequency import CountMinSketch, FrequencyStats

__all__ = ["CountMinSketch", "FrequencyStats"]
