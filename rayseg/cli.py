"""The rayseg command line. Each subcommand parses its arguments here and calls one function
of the module that does the job; heavy imports (torch, ray, mlflow) happen inside handlers so
`rayseg --help` and `rayseg config show` stay fast."""

from __future__ import annotations

import argparse
import sys

from rayseg import config as cfgmod


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loss.rpc.eta=0.7 (repeatable)")


def _load(args: argparse.Namespace) -> cfgmod.Experiment:
    return cfgmod.load(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    exp = _load(args)
    print(cfgmod.dumps(exp.config), end="")
    if exp.grid:
        print("\n# [grid]: %d points" % len(cfgmod.grid_points(exp)))
        for k, v in exp.grid.items():
            print(f"#   {k} = {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayseg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show the fully resolved config of an experiment file")
    csub = p.add_subparsers(dest="config_command", required=True)
    ps = csub.add_parser("show", help="print the resolved config as TOML")
    _add_config_args(ps, required=False)
    ps.set_defaults(func=cmd_config_show)

    # Subcommands of the other modules register here (one block each).
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except cfgmod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
