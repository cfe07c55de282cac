"""MLPerf DLRMv2 (Criteo 1TB multi-hot) table sizes, as published by MLCommons."""
from typing import List

DLRMV2_CARDINALITIES: List[int] = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # 204,184,588 rows; x 128 dims x 4 B = 104.5 GB fp32
DLRMV2_MULTI_HOT: List[int] = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
DLRMV2_DIM = 128
