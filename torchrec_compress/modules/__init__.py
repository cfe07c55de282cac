from .compressed_ebc import CompressedEmbeddingBagCollection
from .memory import MemoryReport, TableMemory

__all__ = ["CompressedEmbeddingBagCollection", "MemoryReport", "TableMemory"]
