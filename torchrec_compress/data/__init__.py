"""Data sets: the embedded synthetic Criteo-like default."""
from .synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names, ids_of

__all__ = ["CRITEO_KAGGLE_CARDINALITIES", "SyntheticCriteo", "cat_names", "ids_of"]
