"""`anyclass support ...`: build SuS support sets from class names (issue 3)."""
from __future__ import annotations


def add_parser(sub) -> None:
    s = sub.add_parser("support", help="build support sets from class names (SuS)")
    s.add_subparsers(dest="support_cmd", required=True)
