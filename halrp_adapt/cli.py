"""`halrp-adapt`: inspect, verify, merge and export shelves of HALRP tasks from the shell.

    halrp-adapt inspect SHELF_OR_REPO [--revision R] [--json]
    halrp-adapt verify SHELF
    halrp-adapt merge SHELF --task T --backbone SPEC --out DIR
    halrp-adapt export-lora SHELF --task T --backbone SPEC --out DIR [--max-rank K]

SPEC builds the backbone the shelf was saved on: `timm:NAME` (ImageNet weights unless
`--no-pretrained`), `hf:PATH_OR_ID` (the index's transformers class, `from_pretrained`) or
`py:MODULE:FUNCTION` (a function returning the model); `--backbone-kwargs '{"num_classes": 10}'`
passes keyword arguments. Bad input ends with one line on stderr and exit status 2; a shelf
that fails `verify` gives status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (
        ValueError,
        FileNotFoundError,
        PermissionError,
        ImportError,
        AttributeError,
        TypeError,
    ) as err:
        print(f"halrp-adapt {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="halrp-adapt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="tasks, ranks per layer, growth, bytes, backbone fingerprint of a folder or Hub repo",
    )
    inspect.add_argument("source", help="a shelf folder or a Hub repo id")
    inspect.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser("verify", help="check every file against the index")
    verify.add_argument("source", help="a shelf folder")
    verify.set_defaults(run=_verify)

    for name, helptext, run in (
        ("merge", "write one task as a plain model (its library's own format)", _merge),
        (
            "export-lora",
            "write one task as a standard PEFT LoRA adapter (exact, or refused with the reason)",
            _export_lora,
        ),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("source", help="a shelf folder or a Hub repo id")
        sub.add_argument("--task", required=True, help="the task to write")
        sub.add_argument(
            "--backbone",
            required=True,
            metavar="SPEC",
            help="timm:NAME, hf:PATH_OR_ID or py:MODULE:FUNCTION",
        )
        sub.add_argument(
            "--backbone-kwargs",
            default="{}",
            metavar="JSON",
            help="keyword arguments for the backbone, as a JSON object",
        )
        sub.add_argument(
            "--no-pretrained",
            action="store_true",
            help="timm: build without downloading pretrained weights",
        )
        sub.add_argument("--revision", help="Hub revision")
        sub.add_argument("--out", required=True, help="output folder")
        if name == "export-lora":
            sub.add_argument(
                "--max-rank",
                type=int,
                default=None,
                help="refuse layers whose exact change needs a higher rank",
            )
            sub.add_argument(
                "--tolerance",
                type=float,
                default=1e-6,
                help="singular values below this share of the largest are zero",
            )
        sub.set_defaults(run=run)
    return parser


# ---- commands ----------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    from .files.hub import resolve_source
    from .files.storage import (
        CONFIG_NAME,
        EVIDENCE_NAME,
        SIGNATURE_NAME,
        WEIGHTS_NAME,
        read_index,
        read_signature,
        read_task_config,
        shared_index_lock,
    )

    root, trusted = resolve_source(args.source, None, args.revision)
    with shared_index_lock(root):  # a save running meanwhile is seen whole or not at all
        index = read_index(root, trusted)
        tasks = {}
        for task in index["tasks"]:
            config = read_task_config(root, task, trusted)
            info = index["task_info"].get(task, {})
            signature = read_signature(root, task, trusted)
            files = [
                n
                for n in (WEIGHTS_NAME, CONFIG_NAME, SIGNATURE_NAME, EVIDENCE_NAME)
                if (root / task / n).exists()
            ]
            evidence = root / task / EVIDENCE_NAME
            tasks[task] = {
                "num_classes": config.num_classes,
                "growth": info.get("growth"),
                "bytes": sum((root / task / n).stat().st_size for n in files),
                "signature": None
                if signature is None
                else {
                    "features": signature.features,
                    "dim": signature.dim,
                    "scatter_rank": signature.rank,
                    "prototypes": int((signature.counts > 0).sum()),
                    "samples": signature.num_samples,
                    "bytes": (root / task / SIGNATURE_NAME).stat().st_size,
                },
                "evidence_bytes": evidence.stat().st_size if evidence.exists() else None,
                "ranks": dict(config.rank_pattern or {}),
                "metrics": dict(config.metrics or {}),
            }
        summary = {
            "source": str(args.source),
            "backbone": index["backbone"],
            "library_version": index.get("library_version"),
            "budget": index["options"].get("budget"),
            "tasks": tasks,
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    backbone = index["backbone"]
    print(f"shelf     {args.source}" + (f" @ {args.revision}" if args.revision else ""))
    print(
        f"backbone  {backbone['class']}, {backbone['params']:,} parameters, "
        f"fingerprint {backbone['fingerprint']}"
    )
    print(f"budget    {summary['budget']} per task; {len(tasks)} tasks\n")
    print(
        f"{'task':<20} {'classes':>7} {'growth':>8} {'bytes':>12} {'mean rank':>9} "
        f"{'signature':>22}  metrics"
    )
    for task, t in tasks.items():
        ranks = list(t["ranks"].values())
        growth = f"{t['growth']:.4f}" if isinstance(t["growth"], (int, float)) else "-"
        mean = f"{sum(ranks) / len(ranks):.1f}" if ranks else "-"
        metrics = ", ".join(f"{k}={v:g}" for k, v in t["metrics"].items())
        sig = t["signature"]
        described = "-" if sig is None else f"{sig['features']} {sig['bytes']:,} B"
        print(
            f"{task:<20} {str(t['num_classes'] or '-'):>7} {growth:>8} {t['bytes']:>12,} "
            f"{mean:>9} {described:>22}  {metrics}"
        )
    layers = sorted({layer for t in tasks.values() for layer in t["ranks"]})
    if layers:
        width = max(len(layer) for layer in layers)
        print(
            "\nranks per layer\n"
            + f"{'layer':<{width}} "
            + " ".join(f"{task[:8]:>8}" for task in tasks)
        )
        for layer in layers:
            print(
                f"{layer:<{width}} "
                + " ".join(f"{tasks[t]['ranks'].get(layer, 0):>8}" for t in tasks)
            )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .files.verify import verify_shelf

    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"`source` {args.source!r} is not a folder.")
    result = verify_shelf(source)
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}")
    if result.ok:
        print(f"OK: {len(result.tasks)} tasks, every file matches the index")
        return 0
    print(f"FAILED: {len(result.problems)} problems in {len(result.tasks)} tasks")
    return 1


def _merge(args: argparse.Namespace) -> int:
    from . import load

    handle = load(_backbone(args), args.source, tasks=[args.task], revision=args.revision)
    out = handle.save_merged(args.task, args.out)
    print(f"wrote task {args.task!r} merged into plain weights: {out}")
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    from . import load
    from .interop.lora_export import export_lora

    handle = load(_backbone(args), args.source, tasks=[args.task], revision=args.revision)
    num_classes = handle._tasks[args.task].config.num_classes
    fresh = _backbone(args, num_classes=num_classes)
    out = export_lora(
        handle, args.task, fresh, args.out, max_rank=args.max_rank, tolerance=args.tolerance
    )
    print(f"wrote task {args.task!r} as a PEFT LoRA adapter: {out}")
    return 0


# ---- building the backbone ---------------------------------------------------------------------
def _backbone(args: argparse.Namespace, num_classes: int | None = None) -> nn.Module:
    """The backbone named by --backbone; with `num_classes`, its head sized for a task (for
    formats that carry the head, such as a LoRA adapter's modules_to_save)."""
    try:
        kwargs = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"`--backbone-kwargs` must be a JSON object: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("`--backbone-kwargs` must be a JSON object, e.g. '{\"num_classes\": 10}'.")
    kind, _, rest = args.backbone.partition(":")
    if kind == "timm" and rest:
        import timm

        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(rest, pretrained=not args.no_pretrained, **kwargs)
    if kind == "hf" and rest:
        return _transformers_backbone(args, rest, kwargs, num_classes)
    if kind == "py" and rest.count(":") == 1:
        module, function = rest.split(":")
        if num_classes is not None and "num_classes" in kwargs:
            kwargs["num_classes"] = num_classes
        model = getattr(importlib.import_module(module), function)(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`--backbone` {args.backbone!r} returned a "
                f"{type(model).__name__}, not a torch.nn.Module."
            )
        return model
    raise ValueError(
        f"`--backbone` must be timm:NAME, hf:PATH_OR_ID or py:MODULE:FUNCTION, "
        f"got {args.backbone!r}."
    )


def _transformers_backbone(
    args: argparse.Namespace, source: str, kwargs: dict[str, Any], num_classes: int | None
) -> nn.Module:
    from .files.hub import resolve_source
    from .files.storage import read_index

    root, trusted = resolve_source(args.source, [], args.revision)
    qualified = read_index(root, trusted)["backbone"]["class"]
    module, _, name = qualified.rpartition(".")
    if not module.startswith("transformers"):
        raise ValueError(
            f"`--backbone` hf:... needs a shelf saved from a transformers model; "
            f"this one was saved from {qualified}."
        )
    cls = getattr(importlib.import_module(module), name)
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    return cls.from_pretrained(source, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
