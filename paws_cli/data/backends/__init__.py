"""Training and evaluation data back ends: in-memory arrays, ImageFolder (PIL) and FFCV .beton files."""
