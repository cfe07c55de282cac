"""One file per scheme; importing this package fills the registry."""
from .base import PhysicalTable, TableScheme, Uncompressed
from .fiited import FIITED
from .freq_threshold import FreqThreshold
from .hashing import Hashing
from .memcom import MEmCom
from .memrec import MemRec
from .mixed_dim import MixedDim
from .mixed_precision import MixedPrecision
from .mpe import MPE
from .qr import QR
from .saec import Saec

__all__ = ["FIITED", "FreqThreshold", "Hashing", "MEmCom", "MemRec", "MixedDim", "MixedPrecision", "MPE", "PhysicalTable", "QR", "Saec", "TableScheme", "Uncompressed"]
