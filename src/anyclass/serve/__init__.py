"""`anyclass serve`: a Gradio web app beside the CLI, equally thin over the library.

    handlers.Service   what each tab does, gradio-free (tests call it directly)
    app.build_app      the page: Classify, Hub, Results tabs
    app.launch         serve it (127.0.0.1 by default)

gradio comes with the optional extra: pip install 'anyclass[app]'. Nothing here is imported
by `import anyclass`, so the CLI starts without it.
"""
