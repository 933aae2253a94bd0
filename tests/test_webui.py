"""The web UI (ldm/webui, scripts/webui.py): the real server on a loopback port, driven through gradio_client and
a headless Chromium; the model manager, the form and the recipe read-back in process.

One server serves every check: they are steps of one test (so that ``make test``'s workers never start two).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.image_io import read_metadata, save_png

gradio_client = pytest.importorskip("gradio_client", reason="the web UI's requirements (requirements-webui.txt)")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
DEMO = ROOT / "ldm/assets/digits_demo"
PROMPT = "a handwritten digit seven"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A models folder: a copy of the demo model (config beside it), the same weights with a config that does not
    fit them, a LoRA-named file and the demo's autoencoder as a standalone VAE (no model is built: fast)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("models")
    shutil.copy(DEMO / "model.safetensors", folder / "tiny.safetensors")
    shutil.copy(DEMO / "config.yaml", folder / "tiny.yaml")
    shutil.copy(DEMO / "model.safetensors", folder / "mismatch.safetensors")
    shutil.copy(TINY, folder / "mismatch.yaml")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)},
              str(folder / "style-lora.safetensors"))
    prefix = "first_stage_model."
    save_file({k[len(prefix):]: v for k, v in load_file(str(DEMO / "model.safetensors")).items() if k.startswith(prefix)},
              str(folder / "vae.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """``python scripts/webui.py`` on a free loopback port, until the module's tests are done."""
    base = tmp_path_factory.mktemp("webui")
    port = _free_port()
    env = {**os.environ, "LDM_CACHE_DIR": str(base / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "webui.py"), "--port", str(port), "--outdir",
                             str(base / "out"), "--models-dir", str(models_dir), "--preview-every", "0"],
                            cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the web UI exited with {proc.returncode}: {(base / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the web UI did not answer in time: {(base / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield {"url": url, "port": port, "outdir": base / "out", "log": base / "server.log", "base": base}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> Client:
    return Client(server["url"], download_files=str(tmp_path_factory.mktemp("downloads")), verbose=False)


def _args(client: Client, endpoint: str, **changes) -> dict:
    """Every parameter of an endpoint at the page's defaults (the settings declaration's, the demo's), changed."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    args = {p["parameter_name"]: p.get("parameter_default") for p in params}
    unknown = set(changes) - set(args)
    assert not unknown, unknown
    args.update(changes)
    return args


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _txt2img_images_carry_recipes_that_regenerate_them_bit_for_bit(client, server, txt2img, tmp_path):
    args = _args(client, "/txt2img", prompt=PROMPT, steps=4, n_samples=2, n_iter=1, seed=11, batch_invariant=True)
    preview, gallery, status = client.predict(**args, api_name="/txt2img")
    assert len(gallery) == 2 and "2 image(s)" in status
    assert preview is not None and Image.open(preview).size == (256, 256)  # the denoised estimate, enlarged 16x
    saved = sorted((server["outdir"] / "txt2img-samples" / "samples").glob("*.png"))
    for item in gallery:
        download = Path(item["image"])
        original = next(p for p in saved if p.name == download.name)
        assert download.read_bytes() == original.read_bytes()  # the saved PNG itself, recipe included
        meta = read_metadata(download)
        assert (meta["prompt"], meta["steps"], meta["script"]) == (PROMPT, 4, "txt2img")
        out = tmp_path / download.stem
        assert txt2img.run(["--regenerate", str(download), "--outdir", str(out)]) == 0
        (again,) = (out / "samples").iterdir()
        assert np.array_equal(_pixels(again), _pixels(download))
    assert [read_metadata(Path(i["image"]))["seed"] for i in gallery] == [11, 12]


def _a_bad_size_is_one_line_in_the_page(client, server):
    with pytest.raises(AppError) as err:
        client.predict(**_args(client, "/txt2img", prompt=PROMPT, width=30, steps=2), api_name="/txt2img")
    message = str(err.value)
    assert message == "width must be a positive multiple of 8, got 30 (try 32)"
    with pytest.raises(AppError, match="no prompt"):
        client.predict(**_args(client, "/txt2img", prompt="", steps=2), api_name="/txt2img")
    assert "Traceback" not in server["log"].read_text()


def _concurrent_requests_queue_and_both_complete(client, server):
    before = set((server["outdir"] / "txt2img-samples" / "samples").glob("*.png"))
    jobs = [client.submit(**_args(client, "/txt2img", prompt=f"a handwritten digit {d}", steps=3, n_samples=2,
                                  n_iter=1, seed=100 * d), api_name="/txt2img") for d in (3, 8)]
    results = [job.result(timeout=60) for job in jobs]
    assert all(len(r[1]) == 2 for r in results)
    after = set((server["outdir"] / "txt2img-samples" / "samples").glob("*.png"))
    made = sorted(after - before)
    assert len(made) == 4  # numbered one after the other, nothing overwritten
    assert sorted(read_metadata(p)["seed"] for p in made) == [300, 301, 800, 801]


def _img2img_and_inpainting_with_a_drawn_mask(client, server, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    _, gallery, _ = client.predict(**_args(client, "/img2img", prompt=PROMPT, image=handle_file(tmp_path / "init.png"),
                                           steps=4, strength=0.5, n_samples=1, n_iter=1), api_name="/img2img")
    meta = read_metadata(Path(gallery[0]["image"]))
    assert (meta["script"], meta["strength"], meta["height"]) == ("img2img", 0.5, 16)
    assert Path(meta["init_img"]).is_file()  # the upload, kept (by content) so the recipe can name it

    stroke = np.zeros((16, 16, 4), np.uint8)
    stroke[4:12, 4:12] = 255  # white, opaque: "repaint here"
    Image.fromarray(stroke, "RGBA").save(tmp_path / "layer.png")
    editor = {"background": handle_file(tmp_path / "init.png"), "layers": [handle_file(tmp_path / "layer.png")],
              "composite": None}
    _, gallery, _ = client.predict(**_args(client, "/inpaint", prompt=PROMPT, image=editor, steps=4, n_samples=1,
                                           n_iter=1), api_name="/inpaint")
    out = Path(gallery[0]["image"])
    meta = read_metadata(out)
    mask = np.asarray(Image.open(meta["mask"]))
    assert meta["script"] == "inpaint" and mask[4:12, 4:12].all() and mask.sum() == 64 * 255
    assert Image.open(out).size == (16, 16)

    with pytest.raises(AppError, match="the mask is empty"):
        client.predict(**_args(client, "/inpaint", prompt=PROMPT, steps=2, image={
            "background": handle_file(tmp_path / "init.png"), "layers": [], "composite": None}), api_name="/inpaint")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(AppError) as err:
        client.predict(**_args(client, "/img2img", prompt=PROMPT, steps=2, image=handle_file(tmp_path / "broken.png")),
                       api_name="/img2img")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def _png_info_reads_a_recipe_back_into_its_tab(client, server, tmp_path):
    png = tmp_path / "recipe.png"
    save_png(torch.zeros(3, 16, 16), png, {"prompt": "a handwritten digit two", "seed": 1234, "steps": 7,
                                           "sampler": "euler", "guidance_scale": 2.5, "height": 16, "width": 16,
                                           "script": "txt2img", "ckpt": str(ROOT / "ldm/assets/digits_demo/model.safetensors"),
                                           "config": "x", "model_sha256": "0" * 64, "original_size": [64, 32]})
    parameters, meta = client.predict(handle_file(png), api_name="/png_info")
    assert "Seed: 1234" in parameters and meta["steps"] == 7
    values = client.predict(handle_file(png), api_name="/send_recipe")
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send_recipe"]["returns"]
    first: dict = {}  # label -> value of its first occurrence: the model picker, then the txt2img tab's fields
    for item, value in zip(returns, values):
        first.setdefault(item["label"].replace(" ", "_"), value)
    assert first["model"] == "digits_demo/model.safetensors"
    assert (first["prompt"], first["seed"], first["steps"], first["sampler"]) == ("a handwritten digit two", 1234, 7,
                                                                                  "euler")
    assert (first["guidance_scale"], first["original_size"], first["n_samples"]) == (2.5, "64,32", 1)
    (tmp_path / "plain.png").write_bytes((ROOT / "ldm/assets/digits_demo/grid.png").read_bytes())
    with pytest.raises(AppError, match="carries no ldm generation metadata"):
        client.predict(handle_file(tmp_path / "plain.png"), api_name="/send_recipe")


def _a_checkpoint_that_does_not_fit_its_config_is_one_line(client, server):
    with pytest.raises(AppError) as err:
        client.predict(_model_name(client, "mismatch.safetensors"), api_name="/switch_model")
    assert "does not fit config" in str(err.value) and "\n" not in str(err.value)
    status = client.predict(_model_name(client, "tiny.safetensors"), api_name="/switch_model")
    assert "tiny.safetensors" in (status if isinstance(status, str) else status[0])
    client.predict("digits_demo/model.safetensors", api_name="/switch_model")


def _model_name(client: Client, filename: str) -> str:
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/switch_model"]["parameters"]
    choices = params[0]["type"].get("enum") or []
    return next(c for c in choices if c.endswith("/" + filename))


def _cancel_stops_the_run_and_writes_nothing(client, server):
    samples = server["outdir"] / "txt2img-samples" / "samples"
    before = set(samples.glob("*.png"))
    job = client.submit(**_args(client, "/txt2img", prompt=PROMPT, steps=400, n_samples=4, n_iter=4),
                        api_name="/txt2img")
    deadline = time.monotonic() + 30
    while job.status().code.name not in ("ITERATING", "PROCESSING", "PROGRESS") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert client.predict(api_name="/txt2img_cancel") in ("cancelling...", "nothing to cancel")
    start = time.monotonic()
    while not job.done() and time.monotonic() - start < 30:
        time.sleep(0.1)
    assert job.done() and time.monotonic() - start < 20
    assert set(samples.glob("*.png")) == before


def _headless_chromium_generates_from_the_page(server, tmp_path):
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        return False
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    try:
        browser.get(server["url"])
        wait = WebDriverWait(browser, 40)
        prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#txt2img-prompt textarea")))
        prompt.send_keys(PROMPT)
        browser.find_element(By.CSS_SELECTOR, "#txt2img-generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#txt2img-gallery img")) >= 6)
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#txt2img-status"), "image(s)"))
        shot = tmp_path / "webui.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    image = Image.open(shot)
    assert image.size[0] >= 1000
    target = os.environ.get("LDM_WEBUI_SCREENSHOT")  # e.g. docs/webui.png, to refresh the README's picture
    if target:
        image.convert("RGB").quantize(colors=128).save(target, optimize=True)
    return True


def test_the_server_end_to_end(server, client, txt2img, tmp_path):
    """scripts/webui.py on a loopback port: each step below, in order, against the one server."""
    steps = [
        lambda: _txt2img_images_carry_recipes_that_regenerate_them_bit_for_bit(client, server, txt2img,
                                                                               tmp_path / "recipe"),
        lambda: _a_bad_size_is_one_line_in_the_page(client, server),
        lambda: _concurrent_requests_queue_and_both_complete(client, server),
        lambda: _img2img_and_inpainting_with_a_drawn_mask(client, server, tmp_path / "inputs"),
        lambda: _png_info_reads_a_recipe_back_into_its_tab(client, server, tmp_path / "png-info"),
        lambda: _a_checkpoint_that_does_not_fit_its_config_is_one_line(client, server),
        lambda: _cancel_stops_the_run_and_writes_nothing(client, server),
    ]
    for folder in ("recipe", "inputs", "png-info", "browser"):
        (tmp_path / folder).mkdir()
    for step in steps:
        started = time.monotonic()
        step()
        print(f"step {steps.index(step)}: {time.monotonic() - started:.1f} s")  # pytest -s shows where time goes
    if not _headless_chromium_generates_from_the_page(server, tmp_path / "browser"):
        pytest.skip("every step passed but the browser one: it needs Debian's chromium and chromium-driver "
                    "(make setup installs them)")


# ---------------------------------------------------------------------------- in process, no server
def test_the_model_manager_lists_the_folders_and_holds_one_model(models_dir):
    from ldm.webui.models import ModelManager

    manager = ModelManager([ROOT / "ldm/assets/digits_demo", models_dir])
    by_kind = {c.path.name: c.kind for c in manager.checkpoints}
    assert by_kind == {"model.safetensors": "model", "tiny.safetensors": "model", "mismatch.safetensors": "model",
                       "style-lora.safetensors": "lora", "vae.safetensors": "vae",
                       "lcm-lora.safetensors": "lora"}  # the demo's own LCM-LoRA, offered in the picker
    assert manager.default_name() == "digits_demo/model.safetensors"
    demo = weakref.ref(manager.load("digits_demo/model.safetensors", "cpu"))
    assert manager.load("digits_demo/model.safetensors", "cpu") is demo()  # already loaded: kept
    tiny_name = next(n for n in manager.names() if n.endswith("/tiny.safetensors"))
    manager.load(tiny_name, "cpu")
    assert demo() is None  # switching freed the previous model
    with pytest.raises(ValueError, match="no model named"):
        manager.find("nope.safetensors")


def test_the_form_follows_the_settings_declaration(monkeypatch):
    from dataclasses import dataclass

    from ldm import settings as declaration
    from ldm.webui import form

    names = [f.name for f in form.fields("txt2img")]
    assert {"sampler", "steps", "guidance_scale", "seed", "height", "width", "negative_prompt", "precision",
            "prompt_2", "refiner_switch", "original_size"} <= set(names)
    assert "strength" not in names and "strength" in form.field_names("img2img")
    assert {f.name for f in form.fields("txt2img") if f.group == "sdxl"} >= {"prompt_2", "aesthetic_score"}
    values = form.initial_values("txt2img", {"height": 16, "steps": 25})
    settings = form.to_settings("txt2img", values)
    assert (settings["height"], settings["steps"], settings["eta"], settings["original_size"]) == (16, 25, None, None)
    assert form.to_settings("txt2img", {**values, "original_size": "1024, 768"})["original_size"] == [1024, 768]
    for bad, message in (({"steps": 2.5}, "steps expects an integer"), ({"original_size": "a,b"}, "two non-negative"),
                         ({"stepz": 3}, "has no field 'stepz'")):
        with pytest.raises(ValueError, match=message):
            form.to_settings("txt2img", {**values, **bad})

    @dataclass
    class WithExtra(declaration.RunSettings):
        sharpness: float = declaration.setting(0.5, "a new setting", check=declaration.between(0, 1))
        sharpen: Optional[bool] = declaration.setting(None, "null = the model's own")

    monkeypatch.setattr(declaration, "RUN_SETTINGS", WithExtra)
    extra = {f.name: f for f in form.fields("txt2img")}
    assert (extra["sharpness"].widget, extra["sharpness"].default, extra["sharpness"].group) == ("number", 0.5,
                                                                                                  "advanced")
    assert extra["sharpen"].widget == "dropdown" and extra["sharpen"].choices == (form.NULL_CHOICE, "true", "false")
    values = form.initial_values("txt2img", {})
    assert form.to_settings("txt2img", {**values, "sharpen": "false"})["sharpen"] is False
    assert form.to_settings("txt2img", values)["sharpen"] is None


def test_nothing_outside_the_web_ui_imports_gradio():
    importers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ldm").rglob("*.py")
                       if "import gradio" in p.read_text() or "from gradio" in p.read_text())
    assert importers == ["ldm/webui/app.py", "ldm/webui/cli.py"]


def test_scripts_webui_help_and_loopback_default():
    from ldm.webui.cli import LOCAL, parser

    args = parser().parse_args([])
    assert (args.listen, args.share, LOCAL) == (None, False, "127.0.0.1")
    assert parser().parse_args(["--listen"]).listen == "0.0.0.0"
    assert parser().parse_args(["--listen", "127.0.0.2"]).listen == "127.0.0.2"
