"""FIITED (Lai et al. 2024): in-training dimension pruning into a chunk pool. ``scheme``: the
config, the lookup, the events and the references; ``family``: the per-step work of all the
tables of one batch key in a fixed number of ops."""
from .family import SKETCH_DEPTH, FIITEDFamily
from .scheme import FIITED, FIITEDScheme

__all__ = ["FIITED", "FIITEDFamily", "FIITEDScheme", "SKETCH_DEPTH"]
