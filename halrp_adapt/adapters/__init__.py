"""The modules that hold each task's state inside a backbone and route by the active task:
adapted layers (scales, factors, bias), per-task norms and heads, the registry of wrappable
layer types, and the choice of which modules to wrap.
"""
