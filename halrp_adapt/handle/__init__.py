"""`HalrpModel`, the object a user holds, and what it does on itself: rank estimation, norm
statistics, parameter accounting, mixed-task batches, and `load` (a handle from files).
"""
