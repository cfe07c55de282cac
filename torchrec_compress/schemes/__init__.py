"""One file per scheme; importing this package fills the registry."""
from .base import PhysicalTable, TableScheme, Uncompressed
from .freq_threshold import FreqThreshold
from .hashing import Hashing
from .memcom import MEmCom
from .memrec import MemRec
from .qr import QR
from .saec import Saec

__all__ = ["FreqThreshold", "Hashing", "MEmCom", "MemRec", "PhysicalTable", "QR", "Saec", "TableScheme", "Uncompressed"]
