"""`megatron-topd` entry point: `train` (a config file + dotted overrides) and `demo` (the CPU demo)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-topd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=name == "train", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 optim.lr=1e-6")
    args = parser.parse_args(argv)
    try:
        from megatron_topd.train import loop  # noqa: F401
    except ImportError:
        print(f"megatron-topd {args.command}: the training loop is not built yet (see the open issues)", file=sys.stderr)
        return 2
    return loop.main(args.command, args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
