"""Output writers: one DCT difspot file per difspot, and the table of all difspots."""

from .difspots import DifspotWriter
from .spot_table import SpotTable, read_spot_table, spot_row

__all__ = ["DifspotWriter", "SpotTable", "read_spot_table", "spot_row"]
