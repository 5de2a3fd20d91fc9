"""Task sequences and the data they come from: class splits, permuted tasks, text topics, the
embedded Fashion-MNIST subset, and the backbones the recipes use (the zoo).
"""
