"""`megatron-topd` entry point: `train` (a config file + dotted overrides), `demo` (the CPU demo) and `experiment`
(the TOPD-vs-OPD comparison, megatron_topd/experiment.py)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["experiment"]:  # its own options (variants, seeds): megatron_topd/experiment.py
        _quiet_library_warnings()
        from megatron_topd import experiment

        return experiment.main(argv[1:])
    parser = argparse.ArgumentParser(prog="megatron-topd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("experiment", help="the TOPD-vs-OPD comparison (see megatron-topd experiment --help)")
    for name in ("train", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=name == "train", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 optim.lr=1e-6")
    args = parser.parse_args(argv)
    _quiet_library_warnings()
    if args.command == "demo":
        from megatron_topd import demo

        return demo.main(args.config, args.overrides)
    from megatron_topd import parallel
    from megatron_topd.config import load_config
    from megatron_topd.train.loop import train

    train(load_config(args.config, args.overrides))
    parallel.destroy()
    return 0


def _quiet_library_warnings() -> None:
    """Megatron-Core and torch.distributed.checkpoint warn about their own deprecations on every rank and step."""
    import warnings

    for module in ("megatron", "torch.distributed", "torch.jit"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


if __name__ == "__main__":
    sys.exit(main())
