"""One file per scheme; importing this package fills the registry."""
from .base import PhysicalTable, TableScheme, Uncompressed
from .hashing import Hashing
from .memcom import MEmCom
from .memrec import MemRec
from .qr import QR

__all__ = ["Hashing", "MEmCom", "MemRec", "PhysicalTable", "QR", "TableScheme", "Uncompressed"]
