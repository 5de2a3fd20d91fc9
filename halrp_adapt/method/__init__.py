"""HALRP's math, top to bottom against HALRP.md section 3: the loss of a batch, the trial
fine-tune, the empirical Fisher, least-squares scales and the residual's SVD, the global rank
choice, magnitude pruning and compact factors. Tensors in, tensors out: nothing here knows the
handle, the adapter modules or files.
"""
