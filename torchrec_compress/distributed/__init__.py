from .sharders import CpuRowWiseEmbeddingBagCollectionSharder, sharders

__all__ = ["CpuRowWiseEmbeddingBagCollectionSharder", "sharders"]
