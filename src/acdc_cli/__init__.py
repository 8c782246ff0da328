"""acdc: sparse image classifiers trained with AC/DC (Peste et al., NeurIPS 2021)."""

__version__ = "0.1.0"
