"""Reading raw ECG files and reading/writing ecgfm's artifacts (Parquet, Arrow IPC, NPZ)."""
