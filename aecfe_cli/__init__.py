"""aecfe: cross-domain white-blood-cell features (AE-CFE, Salehi et al., MICCAI 2022)."""

__version__ = "0.1.0"
