"""Tasks on disk and on the Hub: task tensors in PEFT naming, the shelf (one folder and one
safetensors file per task, an index, a lock), Hub download and upload, verification, merged
export. These work on a handle they are given (typed, never imported at run time).
"""
