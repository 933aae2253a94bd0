#!/usr/bin/env python
"""A web UI (Gradio) for txt2img, img2img and inpainting: python scripts/webui.py [--models-dir DIR] [--port N]

Needs requirements-webui.txt. Serves on 127.0.0.1 (--listen / --share to open it up); --help lists the options.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.webui.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
