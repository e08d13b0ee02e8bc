"""The `oocid` command: parses arguments and calls the library; nothing else lives here."""

from oocid.cli.entry import main

__all__ = ["main"]
