"""Quantized inference export to FBGEMM IntNBit tables (through ``torchrec.quant``)."""
from .export import DTYPES, dequantized_tables, export, load_program, quantized_memory_report, to_program

__all__ = ["DTYPES", "dequantized_tables", "export", "load_program", "quantized_memory_report", "to_program"]
