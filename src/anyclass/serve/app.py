"""The Gradio page over serve/handlers.py: layout and wiring only.

Every handler's AnyclassError becomes its one-line message in the tab's status box (the
CLI's `error: ...` line without the prefix), never a stack trace; anything else is a bug,
which Gradio reports as a bare "Error" while the server's log keeps the trace.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # offline: no telemetry calls

import gradio as gr  # noqa: E402

from ..errors import AnyclassError  # noqa: E402
from .handlers import METHODS, TEMPLATES, Service  # noqa: E402

CSS = """
#status textarea, #hub-status textarea, #results-status textarea { font-family: monospace; }
.anyclass-top { min-width: 240px; }
"""


def _classes_text(names: list[str]) -> str:
    """Names for the class box: comma-separated, or one per line if a name has a comma
    (parse_classes reads both)."""
    return "\n".join(names) if any("," in n for n in names) else ", ".join(names)


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]


def build_app(service: Service) -> gr.Blocks:
    """The three tabs (Classify, Hub, Results) over one Service."""
    # uploads and outputs in Gradio's cache are deleted hourly once a day old
    with gr.Blocks(title="anyclass", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"## anyclass — images into any class names\nbackbone "
                    f"`{service.backbone_spec}` (loaded on first use)")
        with gr.Tab("Classify"):
            _classify_tab(service)
        with gr.Tab("Hub"):
            _hub_tab(service)
        with gr.Tab("Results"):
            _results_tab(service)
    return app


def _classify_tab(service: Service) -> None:
    rows = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label="Images (one or more)", file_count="multiple",
                            type="filepath", elem_id="images")
            task = gr.Dropdown(service.task_names(), value=None,
                               label="World task (fills in its class names)", elem_id="task")
            classes = gr.Textbox(label="Class names", lines=3, elem_id="classes",
                                 placeholder="cat, dog, car — or one per line")
            method = gr.Radio(list(METHODS), value="zeroshot", label="Method",
                              elem_id="method")
            templates = gr.Dropdown(list(TEMPLATES), value="single", label="Prompt templates")
            support = gr.Textbox(label="Support folder (one sub-folder of images per class, "
                                 "or world:TASK)", visible=False, elem_id="support")
            pool = gr.Textbox(value="world:pool", label="Image pool to retrieve the support "
                              "set from (folder:DIR, list:FILE, wds:SHARDS, world:pool)",
                              visible=False, elem_id="pool")
            top_k = gr.Slider(1, 10, value=5, step=1, label="Top k")
            run = gr.Button("Classify", variant="primary", elem_id="classify")
        with gr.Column(scale=2):
            status = gr.Textbox(label="Status", interactive=False, lines=1, max_lines=8,
                                elem_id="status")
            download = gr.File(label="Results as JSON (the rows of `anyclass classify "
                               "--json`)", interactive=False, elem_id="download")

            @gr.render(inputs=rows)
            def show(rows_: list[dict]) -> None:
                for r in rows_:                     # one card per image: it, its top-k bars
                    with gr.Row(equal_height=True):
                        gr.Image(r["image"], show_label=False, height=140, min_width=140,
                                 scale=1, buttons=[], interactive=False)
                        gr.Label({t["class"]: t["score"] for t in r["top"]},
                                 label=Path(r["image"]).name, num_top_classes=len(r["top"]),
                                 scale=3, elem_classes=["anyclass-top"])

    def on_task(name: str | None):
        return gr.update(value=_classes_text(service.task_classes(name))) if name else \
            gr.update()

    def on_method(m: str):
        return (gr.update(visible=m == "tip-adapter"), gr.update(visible=m == "sus-x"),
                gr.update(visible=m != "hub"))

    def on_classify(files_, classes_, method_, templates_, top_k_, support_, pool_):
        try:
            res = service.classify(_paths(files_), classes_, method_, templates_, int(top_k_),
                                   support_, pool_)
        except AnyclassError as e:
            return [], None, str(e)
        lines = list(res.skipped)
        if res.rows:
            lines.append(f"{len(res.rows)} image(s) classified ({method_})")
        shown = [{**r, "image": Path(r["image"]).name} for r in res.rows]
        return res.rows, (str(service.write_json(shown)) if res.rows else None), "\n".join(lines)

    task.change(on_task, task, classes)
    method.change(on_method, method, [support, pool, templates])
    run.click(on_classify, [files, classes, method, templates, top_k, support, pool],
              [rows, download, status], concurrency_limit=2)


def _hub_tab(service: Service) -> None:
    gr.Markdown("The expert hub (MLL): how a class name maps to WordNet, which heads cover "
                "it, and which models a task would run. Default: the offline world's hub.")
    status = gr.Textbox(label="Status", interactive=False, elem_id="hub-status")
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label="Class name", elem_id="hub-name")
            look = gr.Button("Look up", elem_id="hub-lookup")
            mapping = gr.Markdown()
            heads = gr.Dataframe(headers=["model", "head", "head name", "head synset",
                                          "own concept", "score"], label="Heads covering it",
                                 interactive=False)
        with gr.Column():
            names = gr.Textbox(label="Class names of a task", lines=3, elem_id="hub-classes",
                               placeholder="cat, dog, car")
            pick = gr.Button("Models that would run", elem_id="hub-select")
            summary = gr.Markdown()
            chosen = gr.Dataframe(headers=["class", "synset", "model", "head", "head name",
                                           "score"], label="Head per class",
                                  interactive=False)

    def on_lookup(text: str):
        try:
            r = service.hub_lookup(text)
        except AnyclassError as e:
            return str(e), "", []
        alt = ", ".join(f"{s} ({c})" for s, c in r["alternatives"][:4]) or "none"
        md = (f"**{r['name']}** → `{r['synset'] or '(no synset)'}` — {r['how']}, "
              f"confidence {r['confidence']}  \n{r['definition'] or ''}  \n"
              f"runners-up: {alt}")
        if r["synset"] and not r["in_graph"]:
            md += "  \nnot in the hub's graph: no head covers it (the backbone would)"
        table = [[h["model"], h["head"], h["head_name"], h["head_synset"] or "",
                  "yes" if h["own_concept"] else "", h["score"]] for h in r["heads"]]
        return "", md, table

    def on_select(text: str):
        try:
            r = service.hub_select(text)
        except AnyclassError as e:
            return str(e), "", []
        md = (f"models to run: {len(r['models'])} ({', '.join(r['models']) or 'none'}); "
              f"fallback classes: {', '.join(r['fallback']) or 'none'}; "
              f"objective {r['objective']} ({r['solver']})")
        table = [[x["class"], x["synset"] or "(unmapped)", x["model"],
                  "" if x["head"] is None else x["head"], x["head_name"] or "",
                  "" if x["score"] is None else x["score"]] for x in r["rows"]]
        return "", md, table

    look.click(on_lookup, name, [status, mapping, heads])
    name.submit(on_lookup, name, [status, mapping, heads])
    pick.click(on_select, names, [status, summary, chosen])


def _results_tab(service: Service) -> None:
    gr.Markdown(f"Result files under `{service.runs}` (from `anyclass eval --out` and "
                f"`anyclass sweep`): the tables and plots of `anyclass report`.")
    with gr.Row():
        folder = gr.Dropdown(service.result_folders(), label="Folder", elem_id="results-folder",
                             allow_custom_value=False)
        metric = gr.Dropdown(["acc1", "acc5", "mean_per_class_recall"], value="acc1",
                             label="Metric")
        refresh = gr.Button("Refresh list")
        show = gr.Button("Show", variant="primary", elem_id="results-show")
    status = gr.Textbox(label="Status", interactive=False, elem_id="results-status")
    tables = gr.Markdown(elem_id="results-tables")
    plots = gr.Gallery(label="Plots", columns=2, height="auto")

    def on_show(folder_: str | None, metric_: str):
        try:
            text, pngs = service.results(folder_ or ".", metric_)
        except AnyclassError as e:
            return str(e), "", []
        return "", text, [str(p) for p in pngs]

    refresh.click(lambda: gr.update(choices=service.result_folders()), None, folder)
    show.click(on_show, [folder, metric], [status, tables, plots])


def launch(backbone: str = "builtin", host: str = "127.0.0.1", port: int = 7860,
           device: str | None = None, hub: str | None = None, runs: str = "runs",
           quiet: bool = False) -> None:
    """Serve until interrupted. Bound to loopback unless `host` says otherwise: the page
    has no authentication."""
    import signal

    def stop(signum, frame):          # SIGTERM like Ctrl-C: Gradio closes, we clean up
        raise KeyboardInterrupt

    service = Service(backbone, device=device, hub=hub, runs=runs)
    signal.signal(signal.SIGTERM, stop)
    try:
        build_app(service).queue(default_concurrency_limit=2).launch(
            server_name=host, server_port=port, share=False, show_error=False, quiet=quiet,
            ssr_mode=False, run_history=False, footer_links=[], css=CSS,
            allowed_paths=[str(service.scratch)])
    finally:
        service.close()
