"""Above the handle: HALRP as a PEFT tuner, LoRA configs suggested from HALRP's ranks, and
export of a task as a PEFT LoRA adapter.
"""
