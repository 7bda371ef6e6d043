"""Pretraining: the segment data pipeline (data.py), process groups (distributed.py) and the loop (pretrain.py)."""
