"""`anyclass serve`: the web app (Classify, Hub, Results tabs) on a local port."""
from __future__ import annotations

import importlib.util
import sys

from ..errors import AnyclassError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(a) -> int:
    if importlib.util.find_spec("gradio") is None:   # before any model or world work
        raise AnyclassError("the web app needs gradio: pip install 'anyclass[app]'")
    if not 1 <= a.port <= 65535:
        raise AnyclassError(f"--port must be in 1..65535, got {a.port}")
    if a.host not in LOOPBACK:
        print(f"warning: serving on {a.host}: the page has no authentication; anyone who "
              f"can reach this address can use it", file=sys.stderr)
    from ..serve.app import launch
    print(f"anyclass serve: http://{a.host}:{a.port} (backbone {a.backbone}, loaded on "
          f"first use); Ctrl-C stops it", flush=True)
    launch(backbone=a.backbone, host=a.host, port=a.port, device=a.device, hub=a.hub,
           runs=a.runs, quiet=True)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="the web app: classify uploads, browse the hub and "
                       "results (needs the [app] extra)")
    s.add_argument("--backbone", default="builtin", help="backbone spec (loaded once, on the "
                   "first request)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only: the page has no login)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--device")
    s.add_argument("--hub", help="hub file for the Hub tab and --method hub (default: the "
                   "offline world's)")
    s.add_argument("--runs", default="runs", help="folder of result JSON files for the "
                   "Results tab")
    s.set_defaults(fn=cmd_serve)
