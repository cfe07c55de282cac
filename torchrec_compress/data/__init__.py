"""Data sets: the embedded synthetic Criteo-like default, Criteo TSV, Frappe libFM."""
from .criteo import CriteoTSV
from .frappe import FrappeSplit, load_frappe, read_libfm
from .synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names, ids_of

__all__ = ["CriteoTSV", "FrappeSplit", "load_frappe", "read_libfm", "CRITEO_KAGGLE_CARDINALITIES", "SyntheticCriteo", "cat_names", "ids_of"]
