"""A Gradio web UI over :mod:`ldm.generation` (``python scripts/webui.py``; needs ``requirements-webui.txt``).

Modules: :mod:`~ldm.webui.form` (the settings declaration as form fields, browser values -> settings),
:mod:`~ldm.webui.models` (the checkpoint folders and the one loaded model), :mod:`~ldm.webui.jobs` (a request
run through :func:`ldm.runner.prepare` / :func:`~ldm.runner.execute` with progress, previews and cancel),
:mod:`~ldm.webui.recipe` (a PNG's recipe back into the form), :mod:`~ldm.webui.app` (the Gradio page) and
:mod:`~ldm.webui.cli` (the command line). Gradio is needed by ``app`` and ``cli`` only.
"""
