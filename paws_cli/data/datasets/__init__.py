"""Datasets read into uint8 arrays: the array format, Fashion-MNIST and CIFAR-10."""
