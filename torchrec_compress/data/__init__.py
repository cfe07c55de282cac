"""Data sets: the embedded synthetic Criteo-like default (one- or multi-hot), Criteo TSV,
TorchRec npy and MLPerf DLRMv2 multi-hot npz days, Frappe libFM."""
from .criteo import CriteoTSV
from .npy import CriteoNpy, MultiHotCriteoNpy
from .frappe import FrappeSplit, load_frappe, read_libfm
from .synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names, ids_of

__all__ = ["CriteoTSV", "CriteoNpy", "MultiHotCriteoNpy", "FrappeSplit", "load_frappe", "read_libfm", "CRITEO_KAGGLE_CARDINALITIES", "SyntheticCriteo", "cat_names", "ids_of"]
