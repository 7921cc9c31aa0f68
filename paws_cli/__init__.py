"""paws: semi-supervised visual representation learning with PAWS (Assran et al., ICCV 2021)."""

__version__ = "0.1.0"
