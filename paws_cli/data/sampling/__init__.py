"""Which images a step sees: the unlabelled order and class-balanced support samplers, and the batch type."""
