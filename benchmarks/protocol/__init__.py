"""What the quality studies share (studies 2, 3, 8, 10 and the frontier): the task sequences,
the training loop with its compute accounting, HALRP's run and variants, and the PEFT peers.

    sequences.py  the sequences, their splits and pretrained backbones
    fitting.py    the training loop, scoring, passes per task (HALRP's trial counts)
    halrp.py      one HALRP run over a sequence, and the ablations' variants
    peers.py      PEFT's methods sized to a stored-parameter budget, full and sequential FT
"""

from .fitting import (
    TRIAL_EPOCHS,
    accuracy,
    add_protocol_args,
    fit,
    halrp_epochs,
    logits_of,
    norm_names,
    on,
    recalibrate,
)
from .halrp import ABLATIONS, QUICK_ABLATIONS, Variant, groups, run_halrp
from .peers import PEERS, PeerPlan, plan_peer, run_full_ft, run_peer, run_seq_ft
from .sequences import BACKBONES, SEQUENCES, Sequence, Task, make_sequence

__all__ = ["ABLATIONS", "BACKBONES", "PEERS", "QUICK_ABLATIONS", "SEQUENCES", "TRIAL_EPOCHS",
           "PeerPlan", "Sequence", "Task", "Variant", "accuracy", "add_protocol_args", "fit",
           "groups", "halrp_epochs", "logits_of", "make_sequence", "norm_names", "on",
           "plan_peer", "recalibrate", "run_full_ft", "run_halrp", "run_peer", "run_seq_ft"]
