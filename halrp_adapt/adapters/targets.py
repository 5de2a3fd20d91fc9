"""Which modules of a model get adapters, per-task norms and a per-task head.

Name matching follows PEFT: a list entry matches a module whose name equals it or ends with
``"." + entry``; a single string is a regex that must match the whole name.

Default targets, whatever the family: every layer of a registered type (Linear, Conv2d,
transformers' Conv1D, and users' own) outside the classifier head. So timm ViTs adapt
`patch_embed.proj` (a strided Conv2d) and every attention/MLP Linear; ResNets and EfficientNets
every conv (depthwise convs keep only their scales); BERT every Linear of its encoder and
pooler (embeddings are frozen and shared); GPT-2 every Conv1D (`lm_head` is the head).
"""

from __future__ import annotations

import re

from torch import nn

from .registry import adapter_class_for, is_norm, supported_layer_types

Patterns = list[str] | str | None


def name_matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _inside(name: str, parent: str | None) -> bool:
    return parent is not None and (name == parent or name.startswith(parent + "."))


def select_targets(
    model: nn.Module, head: str | None, target_modules: Patterns, exclude_modules: Patterns
) -> list[str]:
    """Names of the modules to wrap with adapter layers, in model order.

    Raises ValueError when nothing is found, when a `target_modules` or `exclude_modules`
    entry matches no module, or when a target has a type no adapter is registered for.
    """
    names = [n for n, _ in model.named_modules() if n]
    _check_patterns_match(names, "target_modules", target_modules)
    _check_patterns_match(names, "exclude_modules", exclude_modules)
    chosen = []
    for name, module in model.named_modules():
        if not name or _inside(name, head):
            continue
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        if target_modules is not None and not name_matches(name, target_modules):
            continue
        if adapter_class_for(module) is not None:
            chosen.append(name)
    if target_modules is not None:
        _check_entries_select(model, target_modules, chosen)
    # A selected module inside another selected module (e.g. a custom Linear subclass holding a
    # Linear) would be wrapped twice: keep the outermost.
    outer = [n for n in chosen if not any(_inside(n, o) and n != o for o in chosen)]
    if not outer:
        raise ValueError(
            "no adaptable layer found: the model has no module of a supported type "
            f"({supported_layer_types()}) outside its head that `target_modules` and "
            "`exclude_modules` select."
        )
    return outer


def select_scaled(targets: list[str], scale_modules: Patterns) -> list[str]:
    """The adapted layers that get dense scales: all of them when `scale_modules` is None.

    Raises ValueError when `scale_modules` (or one of its entries) matches no adapted layer.
    """
    if scale_modules is None:
        return list(targets)
    _check_patterns_match(targets, "scale_modules", scale_modules, "adapted layer")
    return [t for t in targets if name_matches(t, scale_modules)]


def select_norms(model: nn.Module, head: str | None, targets: list[str]) -> list[str]:
    """Names of the normalisation layers that get per-task copies (outside the head)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or _inside(name, head) or any(_inside(name, t) for t in targets):
            continue
        if any(_inside(name, n) for n in names):
            continue
        if is_norm(module):
            names.append(name)
    return names


def _check_entries_select(model: nn.Module, patterns: list[str] | str, chosen: list[str]) -> None:
    """Each `target_modules` entry must select at least one module of a supported type."""
    entries = [patterns] if isinstance(patterns, str) else patterns
    for entry in entries:
        form = entry if isinstance(patterns, str) else [entry]
        if any(name_matches(n, form) for n in chosen):
            continue
        matched = [n for n, _ in model.named_modules() if n and name_matches(n, form)]
        raise ValueError(
            f"`target_modules` entry {entry!r} matches only modules of types no adapter is "
            f"registered for: {_describe(model, matched)}; supported types: "
            f"{supported_layer_types()} (add one with halrp_adapt.register_layer_type)."
        )


def _check_patterns_match(
    names: list[str], option: str, patterns: Patterns, among: str = "module of the model"
) -> None:
    """Raise ValueError naming `option` when `patterns` is a bad regex, or when it (or one of
    its entries) matches none of `names`."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"`{option}` {patterns!r} is not a valid regex: {err}.") from None
        if not any(name_matches(n, patterns) for n in names):
            raise ValueError(f"`{option}` regex {patterns!r} matches no {among}.")
        return
    missing = [p for p in patterns if not any(name_matches(n, [p]) for n in names)]
    if missing:
        raise ValueError(f"`{option}` entries {missing} match no {among} (e.g. {names[:5]}).")


def _describe(model: nn.Module, names: list[str]) -> str:
    shown = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names[:5]]
    return ", ".join(shown) + (" ..." if len(names) > 5 else "")
