"""Quantized inference export to FBGEMM IntNBit tables (through ``torchrec.quant``)."""
from .export import DTYPES, dequantized_tables, export, quantized_memory_report

__all__ = ["DTYPES", "dequantized_tables", "export", "quantized_memory_report"]
