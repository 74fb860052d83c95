"""The ``metering-gateway`` command: serve, health, meter, records (admin), local-aws.

:mod:`.parser` is the grammar, :mod:`.commands` what each command does, :mod:`.admin`
the gRPC client of a running gateway those commands use, :mod:`.records_output` how
records are printed. Here is only :func:`main`, the console script's entry point.

The outermost package: it may import any of the gateway (the assembly to serve,
:mod:`gateway.local_aws` for ``local-aws``); nothing of the gateway imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateway.cli import commands
from gateway.cli.parser import build_parser
from gateway.config import ConfigError, settings_from

_parser = build_parser  # the name tests import

__all__ = ["_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            commands.exit_now(commands.serve(settings_from(args)))
        if args.command == "health":
            return commands.health_check(args)
        if args.command == "meter":
            return commands.meter(args)
        if args.command == "records":
            return commands.RECORDS_COMMANDS[args.records_command](args)
        return commands.local_aws(args)
    except ConfigError as exc:
        print(f"metering-gateway: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
