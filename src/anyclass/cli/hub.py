"""`anyclass hub ...`: the expert-model hub (issue 4)."""
from __future__ import annotations


def add_parser(sub) -> None:
    h = sub.add_parser("hub", help="the expert-model hub: init, add, label, list, show, select")
    h.add_subparsers(dest="hub_cmd", required=True)
