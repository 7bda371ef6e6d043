"""ecgfm: a command-line toolkit for ECG foundation models (ECG-FM re-implemented without fairseq)."""

__version__ = "0.1.0"
