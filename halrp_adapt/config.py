"""`HalrpConfig`: every option of HALRP, with the reference code's defaults.

It is a PEFT `PeftConfig`, so that `peft.get_peft_model(model, HalrpConfig(...))` works and a
saved task's `adapter_config.json` is a PEFT adapter config. The fields under "per task" are
filled in by the library when a task is saved: they describe that task's exact shapes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

SVD_METHODS = ("auto", "full", "randomized")
FISHER_METHODS = ("trial", "pass")
TRIAL_METHODS = ("low-rank", "full")
PLACEMENTS = ("budget", "paper")
SIGNATURE_CHOICES = ("backbone", "task", None)
FORMAT_VERSION = 1


class HalrpType(str, enum.Enum):
    """HALRP's entry in PEFT's type tables (PEFT's own `PeftType` enum cannot be extended)."""

    HALRP = "HALRP"


@dataclass
class HalrpConfig(PeftConfig):
    """Options of a HALRP attachment.

    Defaults follow the reference code (lijiaqi/HALRP, ``scripts/*.sh``): explained share 0.9,
    upper rank 100, L1 1e-6, weight decay 1e-4, prune floor 1e-5, one trial epoch.

    Example:
        >>> from halrp_adapt import HalrpConfig
        >>> HalrpConfig(budget=0.02, upper_rank=32).explained
        0.9
    """

    budget: float = field(
        default=0.05,
        metadata={"help": "Most parameters a task may add, as a share of the backbone's (0, 1]."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Layers to adapt: a list of names (exact or dotted suffix) or one regex "
            "(full match). None adapts every supported layer except the classifier head."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers never to adapt, same forms as `target_modules`."},
    )
    scale_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Adapted layers that get the dense scales r and s, same forms as "
            "`target_modules`; None gives them to every adapted layer (the paper), [] to none. "
            "A layer without scales puts its whole change into its factors."
        },
    )
    placement: str = field(
        default="budget",
        metadata={
            "help": "How a task's budget is spent: 'budget' (every dense part, a layer's scales "
            "or bias, a norm copy with its statistics, competes with the factors' ranks by "
            "Fisher-weighted gain per stored parameter; a part not kept is the backbone's own, "
            "shared and frozen; works at any budget that holds one part) or 'paper' (every "
            "task keeps every scale, bias and norm copy, and the budget must hold them all "
            "before any factor)."
        },
    )
    head_module: str | None = field(
        default=None,
        metadata={
            "help": "Name of the classifier head; detected for timm, transformers and "
            "plain models when None."
        },
    )
    task_heads: bool = field(
        default=True,
        metadata={
            "help": "Give each task its own classifier head. False keeps the head shared "
            "and frozen (e.g. a causal LM's tied `lm_head`)."
        },
    )
    explained: float = field(
        default=0.9,
        metadata={
            "help": "Share of the Fisher-weighted residual energy the ranks must explain "
            "(the reference's approxiRate), in (0, 1]."
        },
    )
    upper_rank: int = field(default=100, metadata={"help": "Largest rank of any layer (>= 1)."})
    l1: float = field(default=1e-6, metadata={"help": "L1 weight on |A| + |B| (l1_hyp)."})
    wd: float = field(
        default=1e-4,
        metadata={"help": "L2 weight on (r^2 + s^2 + A^2 + B^2) / 2 (wd_rate)."},
    )
    prune_floor: float = field(
        default=1e-5,
        metadata={"help": "Factor entries at or below this magnitude are pruned at end_task."},
    )
    trial_epochs: int = field(
        default=1, metadata={"help": "Epochs of the trial fine-tune (estRank_epoch)."}
    )
    trial_steps: int | None = field(
        default=None,
        metadata={"help": "Stop the trial fine-tune after this many steps (overrides epochs)."},
    )
    trial_lr: float | str = field(
        default="auto",
        metadata={
            "help": "Adam learning rate of the trial, or 'auto': by kind of backbone "
            "(trial.LOW_RANK_TRIAL_LRS for the low-rank trial, trial.TRIAL_LRS for the full "
            "one; the paper's 1e-3 for a backbone trained by the first task)."
        },
    )
    trial: str = field(
        default="low-rank",
        metadata={
            "help": "How the trial fine-tune runs: 'low-rank' (on the model itself, through "
            "the task's own scales, biases, norms and head plus temporary factors of rank "
            "`trial_rank`: no copy of the model, no dense gradient or optimiser state) or "
            "'full' (the paper's: every adapted weight of a merged copy trained with Adam)."
        },
    )
    trial_rank: int = field(
        default=32,
        metadata={
            "help": "Rank of the temporary factors of a low-rank trial (the change a layer "
            "can make beyond its scales, and so the largest rank it can be given)."
        },
    )
    fisher: str = field(
        default="trial",
        metadata={
            "help": "Where rank estimation's empirical Fisher comes from: 'trial' (the "
            "trial's own gradients over its last 20% of steps, no extra pass) or 'pass' (the "
            "reference's separate pass over `fisher_data` at the trial's final weights)."
        },
    )
    svd: str = field(
        default="auto",
        metadata={
            "help": "SVD of the residuals: 'full' (torch.linalg.svd), 'randomized' "
            "(torch.svd_lowrank, the leading upper_rank + 10 triplets), or 'auto': "
            "randomized for layers at least `randomized_min_dim` wide whose `upper_rank` "
            "+ 10 is at most half their width, with the whole spectrum computed for any "
            "layer whose truncation could change the explained-share choice."
        },
    )
    randomized_min_dim: int = field(
        default=256,
        metadata={
            "help": "With svd='auto', layers whose smaller side is at least this may use the "
            "randomized SVD."
        },
    )
    task_signature: str | None = field(
        default="backbone",
        metadata={
            "help": "Features each task's signature (for finding an input's task without its "
            "name) is made of: 'backbone' (the frozen backbone's, one extra forward), 'task' "
            "(the task's own, one forward per task), or None (no signature)."
        },
    )
    signature_rank: int | None = field(
        default=64,
        metadata={
            "help": "A task signature keeps its within-class scatter as this many leading "
            "eigenpairs plus the diagonal ((rank + 1) x D numbers for D-wide features); None "
            "keeps the whole D x D matrix."
        },
    )
    retrieval_candidates: int | None = field(
        default=None,
        metadata={
            "help": "With task_ids='auto' and 'backbone' signatures: how many tasks, best "
            "first by the frozen features' posterior, an input may run through; each "
            "candidate's own evidence (its head's confidence and its own-feature statistics, "
            "standardised on the task's held-out data) re-checks the frozen guess. None: 2 "
            "with task_signature='backbone', else 1; 1 trusts the frozen features alone."
        },
    )
    retrieval_check_below: float = field(
        default=0.999,
        metadata={
            "help": "With retrieval_candidates > 1: only inputs whose best task posterior is "
            "below this run through their other candidates (0 checks none, above 1 every "
            "input); confident inputs cost one forward."
        },
    )
    train_base: bool = field(
        default=False,
        metadata={
            "help": "The first task trains the backbone itself (the paper's from-scratch "
            "protocol); later tasks get adapters."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: a new task starts as the backbone (identity scales, the base's "
            "biases, no factors). False: it starts away from it, with random scales near 1, "
            "perturbed biases and random rank-2 factors, for tests (PEFT's convention). "
            "estimate_ranks replaces all of these."
        },
    )

    # ---- per task: written by save_pretrained, read when a task is loaded ----------------------
    num_classes: int | None = field(
        default=None, metadata={"help": "Classes of this task's head (None: the backbone's head)."}
    )
    trains_base: bool = field(
        default=False, metadata={"help": "This task trained the backbone itself (train_base)."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Rank of each adapted layer for this task."}
    )
    sparse_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Nonzero count of each factor held compactly, keyed '<layer>.A'/'.B'."},
    )
    norm_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Normalisation layers with this task's own copy (None: all of them)."},
    )
    bias_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Adapted layers with this task's own bias (None: every one whose base "
            "layer has a bias); the others run the base bias."
        },
    )
    backbone_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the frozen backbone the task was made on."}
    )
    metrics: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Figures measured on this task, e.g. accuracy."}
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Version of halrp_adapt's file format."}
    )

    @property
    def candidates(self) -> int:
        """The number of candidate tasks `task_ids="auto"` checks (`retrieval_candidates`,
        with None resolved)."""
        if self.retrieval_candidates is not None:
            return self.retrieval_candidates
        return 2 if self.task_signature == "backbone" else 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HalrpType.HALRP
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"`format_version` {self.format_version!r} is not supported by this "
                f"halrp_adapt (it reads version {FORMAT_VERSION})."
            )
        _check_number("budget", self.budget, low=0.0, high=1.0, low_open=True)
        _check_number("explained", self.explained, low=0.0, high=1.0, low_open=True)
        for name in ("l1", "wd", "prune_floor"):
            _check_number(name, getattr(self, name), low=0.0, high=None)
        if self.trial_lr != "auto":
            if isinstance(self.trial_lr, str):
                raise ValueError(
                    f"`trial_lr` must be 'auto' or a number > 0, got {self.trial_lr!r}."
                )
            _check_number("trial_lr", self.trial_lr, low=0.0, high=None, low_open=True)
        _check_int("upper_rank", self.upper_rank, minimum=1)
        _check_int("trial_epochs", self.trial_epochs, minimum=0)
        _check_int("randomized_min_dim", self.randomized_min_dim, minimum=1)
        if self.trial_steps is not None:
            _check_int("trial_steps", self.trial_steps, minimum=1)
        if self.task_signature not in SIGNATURE_CHOICES:
            raise ValueError(
                f"`task_signature` must be one of {SIGNATURE_CHOICES}, got {self.task_signature!r}."
            )
        if self.signature_rank is not None:
            _check_int("signature_rank", self.signature_rank, minimum=1)
        if self.retrieval_candidates is not None:
            _check_int("retrieval_candidates", self.retrieval_candidates, minimum=1)
            if self.retrieval_candidates > 1 and self.task_signature != "backbone":
                raise ValueError(
                    "`retrieval_candidates` > 1 needs task_signature='backbone' (candidates are "
                    f"ranked in the frozen features), got task_signature={self.task_signature!r}; "
                    "use retrieval_candidates=1 (or None) with it."
                )
        _check_number("retrieval_check_below", self.retrieval_check_below, low=0.0, high=None)
        for name in ("task_heads", "train_base", "init_weights", "trains_base"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.trial not in TRIAL_METHODS:
            raise ValueError(f"`trial` must be one of {TRIAL_METHODS}, got {self.trial!r}.")
        _check_int("trial_rank", self.trial_rank, minimum=1)
        if self.fisher not in FISHER_METHODS:
            raise ValueError(f"`fisher` must be one of {FISHER_METHODS}, got {self.fisher!r}.")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"`svd` must be one of {SVD_METHODS}, got {self.svd!r}.")
        for name in ("target_modules", "exclude_modules", "scale_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
                setattr(self, name, list(value))
                continue
            raise TypeError(
                f"`{name}` must be None, a regex string or a list of module names, "
                f"got {type(value).__name__}."
            )
        if self.head_module is not None and not isinstance(self.head_module, str):
            raise TypeError(
                f"`head_module` must be a module name (str) or None, "
                f"got {type(self.head_module).__name__}."
            )

    @classmethod
    def option_names(cls) -> list[str]:
        """The user-facing options (not PEFT's bookkeeping nor the per-task fields)."""
        skip = ({f.name for f in dataclasses.fields(PeftConfig)} | set(TASK_FIELDS)) - {
            "base_model_name_or_path"
        }
        return [f.name for f in dataclasses.fields(cls) if f.name not in skip]

    @classmethod
    def from_options(cls, **options: Any) -> HalrpConfig:
        """Build a config from keyword options, naming any option that does not exist."""
        allowed = set(cls.option_names())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; allowed options: {sorted(allowed)}.")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}


# Options that decide which modules get wrapped, once, when the first task is added: every task
# of a model shares them (a PEFT adapter whose config asks for others is refused).
STRUCTURAL_OPTIONS = (
    "target_modules",
    "exclude_modules",
    "head_module",
    "task_heads",
    "train_base",
    "task_signature",
)

TASK_FIELDS = (
    "num_classes",
    "trains_base",
    "rank_pattern",
    "sparse_pattern",
    "norm_modules",
    "bias_modules",
    "backbone_fingerprint",
    "metrics",
    "format_version",
)


def _check_number(
    name: str, value: Any, low: float, high: float | None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high) or value != value:
        left = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"`{name}` must be in {left}{low}, {upper}, got {value}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
