"""`paws sweep`: a grid (or TPE sampler) over settings, selected on a validation split, tested once."""
