"""``tandem config show``: the effective configuration."""

from __future__ import annotations

import argparse
import json


def cmd_config_show(args: argparse.Namespace, config: dict) -> int:
    print(json.dumps(config, indent=2))
    return 0


def register(commands) -> None:
    """Add this group's commands to the ``tandem`` parser."""
    config_parser = commands.add_parser("config", help="show the effective configuration")
    config_parser.set_defaults(group_parser=config_parser)
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print the configuration after file and overrides")
    show.set_defaults(handler=cmd_config_show)
