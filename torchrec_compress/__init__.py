"""torchrec-compress: embedding-table compression schemes for TorchRec.

Public API::

    from torchrec_compress import CompressedEmbeddingBagCollection, compress_, Hashing, QR, MEmCom, sharders
"""
from .config import SchemeConfig, register_scheme
from .modules import CompressedEmbeddingBagCollection, MemoryReport, TableMemory
from .modules.compress import compress_
from .schemes import FIITED, MPE, QR, FreqThreshold, Hashing, MEmCom, MemRec, Saec
from .mpe import fit_mpe_groups_, mpe_choose_, mpe_finalize, mpe_penalty, run_mpe
from .fit import fit_frequency_, fit_saec_
from .distributed.sharders import sharders

__all__ = [
    "CompressedEmbeddingBagCollection",
    "FIITED",
    "FreqThreshold",
    "Hashing",
    "MEmCom",
    "MPE",
    "MemRec",
    "MemoryReport",
    "QR",
    "Saec",
    "SchemeConfig",
    "TableMemory",
    "compress_",
    "fit_frequency_",
    "fit_saec_",
    "fit_mpe_groups_",
    "mpe_choose_",
    "mpe_finalize",
    "mpe_penalty",
    "run_mpe",
    "register_scheme",
    "sharders",
]
__version__ = "0.1.0"
