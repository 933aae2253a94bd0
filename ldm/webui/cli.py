"""``python scripts/webui.py`` / ``ldm-webui``: serve the page (on 127.0.0.1 unless told otherwise).

    python scripts/webui.py                              # http://127.0.0.1:7860, the bundled demo model
    python scripts/webui.py --models-dir ~/models --port 8000
    python scripts/webui.py --listen                     # every interface (0.0.0.0), or --listen ADDRESS
    python scripts/webui.py --share                      # also a public Gradio share link
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldm.run_config import DEMO_DIR

LOCAL = "127.0.0.1"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webui.py", description="A web UI (Gradio) for txt2img, img2img and inpainting.")
    p.add_argument("--models-dir", action="append", type=Path, metavar="DIR",
                   help="a folder of checkpoints (.safetensors / .ckpt, with NAME.yaml beside those whose config "
                        "cannot be guessed); repeatable; default ./models. The bundled demo model is always listed.")
    p.add_argument("--outdir", type=Path, default=Path("outputs/webui"),
                   help="where the images go: OUTDIR/<task>-samples/samples/NNNNN.png (default outputs/webui)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                   help=f"serve on ADDRESS (alone: 0.0.0.0, every interface) instead of {LOCAL}")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N for loading models (default auto)")
    p.add_argument("--preview-every", type=float, default=1.0, metavar="SECONDS",
                   help="decode a preview of the image being denoised at most this often (negative: never)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ldm.cli_errors import fail, first_line, user_errors

    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the web UI needs gradio: pip install -r requirements-webui.txt (or pip install 'ldm[webui]')")
    from ldm.webui.app import Options, WebUI
    from ldm.webui.models import ModelManager

    folders = [DEMO_DIR, *(args.models_dir or [Path("models")])]
    try:
        manager = ModelManager(folders)
        ui = WebUI(manager, Options(args.outdir.absolute(), args.device, args.preview_every))
        manager.load(ui.current, args.device)  # the first request does not wait for it; a bad file says so now
        page = ui.build()
    except user_errors() as err:
        fail(first_line(err))
    page.queue(default_concurrency_limit=1)
    args.outdir.mkdir(parents=True, exist_ok=True)
    page.launch(server_name=args.listen or LOCAL, server_port=args.port, share=args.share,
                allowed_paths=[str(args.outdir.absolute())], show_error=False, footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
