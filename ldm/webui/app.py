"""The Gradio page: a model picker, txt2img / img2img / inpainting tabs whose fields come from the settings
declaration (:mod:`ldm.webui.form`), a live progress bar with previews, cancel, a gallery of the saved PNGs
(downloads are those files, recipe included) and a "PNG info" tab that reads a recipe back into its tab.

Every generate event and model switch shares one queue slot (``concurrency_id="model"``, limit 1):
concurrent requests wait their turn instead of racing on the model.
"""
from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr
from PIL import Image

from ldm.cli_errors import first_line, user_errors
from ldm.image_io import open_image, read_metadata
from ldm.webui import form, jobs
from ldm.webui.models import ModelManager
from ldm.webui.recipe import read_recipe

log = logging.getLogger("ldm.webui")
NONE = "(none)"  # the pickers' "nothing chosen" entry
MODEL_QUEUE = "model"


@dataclass
class Options:
    """How the server runs: where outputs go, which device, how often previews are decoded."""

    outdir: Path
    device: str = "auto"
    preview_every: float = 1.0


@dataclass
class TaskTab:
    """The components of one task's tab."""

    task: str
    prompt: gr.Textbox
    image: Optional[gr.components.Component]  # img2img: gr.Image; inpaint: gr.ImageEditor
    fields: dict[str, gr.components.Component]
    refiner: gr.Dropdown
    vae: gr.Dropdown
    lora: gr.Dropdown
    sdxl: gr.Accordion
    preview: gr.Image
    status: gr.Markdown
    gallery: gr.Gallery
    generate: gr.Button
    cancel: gr.Button
    inputs: dict[str, gr.components.Component] = field(default_factory=dict)  # request name -> component


def user_message(err: BaseException) -> str:
    """The one line the page shows for a failed request (a bug's traceback goes to the server's log only)."""
    if isinstance(err, user_errors()):
        return first_line(err)
    log.error("request failed", exc_info=err)
    return f"internal error ({type(err).__name__}: {first_line(err)}); the server's log has the details"


def _component(task: str, f: form.Field, value: Any) -> gr.components.Component:
    common = dict(label=f.label, info=f.help, value=value, elem_id=f"{task}-{f.name}")
    if f.widget == "dropdown":
        return gr.Dropdown(choices=list(f.choices), **common)
    if f.widget == "checkbox":
        return gr.Checkbox(**common)
    if f.widget in ("integer", "number"):
        placeholder = "null: " + f.help.split("null = ")[-1] if f.nullable and "null = " in f.help else None
        return gr.Number(precision=0 if f.widget == "integer" else None, placeholder=placeholder, **common)
    if f.widget == "pair":
        return gr.Textbox(placeholder="height,width (empty = null)" if f.nullable else None, **common)
    return gr.Textbox(lines=2 if f.name.startswith("negative_prompt") else 1, **common)


def _handler(names: list[str], body: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """A generator taking exactly ``names`` as keyword arguments (their API names), plus the request and a
    progress tracker; any other name is refused, never swallowed."""
    def handler(request: gr.Request, progress: gr.Progress = gr.Progress(), **values: Any) -> Iterator[Any]:
        if set(values) != set(names):
            raise gr.Error(f"unexpected fields {sorted(set(values) ^ set(names))}", print_exception=False)
        yield from body(request, progress, values)

    kind = inspect.Parameter
    handler.__signature__ = inspect.Signature(
        [kind("request", kind.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
         kind("progress", kind.POSITIONAL_OR_KEYWORD, default=gr.Progress(), annotation=gr.Progress),
         *[kind(n, kind.KEYWORD_ONLY) for n in names]])
    return handler


class WebUI:
    """The page and what it holds: the model manager, the per-session cancel switches."""

    def __init__(self, manager: ModelManager, options: Options):
        self.manager, self.options = manager, options
        self.cancels: dict[str, threading.Event] = {}
        self.tabs: dict[str, TaskTab] = {}
        self.current = manager.default_name()

    # ------------------------------------------------------------------ requests
    def _request(self, task: str, values: dict[str, Any]) -> jobs.Request:
        image, mask = values.pop("image", None), None
        if task == "inpaint" and isinstance(image, dict):
            background, layers = image.get("background"), [l for l in image.get("layers") or [] if l is not None]
            mask = _union(layers) if layers else None
            image = background
        refiner, vae, lora = (None if v in (None, NONE) else v for v in
                              (values.pop("refiner"), values.pop("vae"), values.pop("lora_file")))
        return jobs.Request(task, values.pop("model"), values.pop("prompt") or "", values, image, mask, refiner, vae,
                            lora)

    def _generate(self, task: str, request: gr.Request, progress: gr.Progress, values: dict[str, Any]) -> Iterator[Any]:
        session = getattr(request, "session_hash", None) or "api"
        cancel = self.cancels[session] = threading.Event()
        progress(0.0, desc="waiting for the model")
        try:
            req = self._request(task, dict(values))
        except (ValueError, KeyError) as err:
            raise gr.Error(first_line(err), print_exception=False) from None
        preview: Any = gr.skip()
        events = jobs.stream(req, self.manager, self.options.outdir, cancel, self.options.preview_every)
        try:
            for event in events:
                if event.kind == "progress":
                    progress(event.fraction, desc=event.text)
                    if event.preview is not None:
                        preview = event.preview
                        yield preview, gr.skip(), f"{event.text} ({100 * event.fraction:.0f}%)"
                elif event.kind == "done":
                    yield preview, self._gallery(event.result.samples), self._summary(event)
                else:
                    if isinstance(event.error, jobs.Cancelled):
                        yield gr.skip(), gr.skip(), "cancelled; nothing was written"
                        return
                    raise gr.Error(user_message(event.error), print_exception=False)
        finally:
            events.close()
            if self.cancels.get(session) is cancel:
                del self.cancels[session]

    @staticmethod
    def _gallery(samples: list[Path]) -> list[tuple[str, str]]:
        out = []
        for path in samples:
            seed = read_metadata(path).get("seed")
            out.append((str(path), f"{path.name} (seed {seed})"))
        return out

    @staticmethod
    def _summary(event: jobs.Event) -> str:
        samples = event.result.samples
        where = samples[0].parent if samples else "?"
        return f"{len(samples)} image(s) in `{where}` in {event.seconds:.1f} s; each PNG carries its recipe"

    def cancel(self, request: gr.Request) -> str:
        session = getattr(request, "session_hash", None) or "api"
        switch = self.cancels.get(session)
        if switch is None:
            return "nothing to cancel"
        switch.set()
        return "cancelling..."

    # ------------------------------------------------------------------ models
    def switch_model(self, name: str) -> dict:
        """Load the picked model (freeing the previous one); show or hide the SDXL sections."""
        try:
            self.manager.load(name, self.options.device)
            sdxl = self.manager.is_sdxl(name)
        except user_errors() as err:
            raise gr.Error(user_message(err), print_exception=False) from None
        self.current = name
        updates: dict = {self.model_status: f"loaded **{name}**"}
        for tab in self.tabs.values():
            updates[tab.sdxl] = gr.update(visible=sdxl)
        return updates

    def model_defaults(self, name: str) -> dict:
        """The fields a model config's ``sampling:`` gives defaults for, at that model's values."""
        try:
            defaults = self.manager.sampling_defaults(name)
        except user_errors() as err:
            raise gr.Error(user_message(err), print_exception=False) from None
        updates: dict = {}
        for task, tab in self.tabs.items():
            for key, value in form.model_default_values(task, defaults).items():
                updates[tab.fields[key]] = value
        return updates

    def refresh(self) -> dict:
        self.manager.refresh()
        models = self.manager.names()
        updates: dict = {self.model_picker: gr.update(choices=models)}
        for tab in self.tabs.values():
            updates[tab.refiner] = gr.update(choices=[NONE, *models])
            updates[tab.vae] = gr.update(choices=[NONE, *self.manager.names("vae")])
            updates[tab.lora] = gr.update(choices=[NONE, *self.manager.names("lora")])
        return updates

    # ------------------------------------------------------------------ PNG info
    def png_info(self, path: Optional[str]) -> tuple[str, Any]:
        if not path:
            return "", None
        try:
            meta = read_metadata(path)
        except user_errors() as err:
            raise gr.Error(user_message(err), print_exception=False) from None
        return open_image(path).info.get("parameters", ""), meta

    def send_recipe(self, path: Optional[str]) -> dict:
        if not path:
            raise gr.Error("upload a PNG written by ldm first", print_exception=False)
        try:
            recipe = read_recipe(path, self.manager)
        except user_errors() as err:
            raise gr.Error(user_message(err), print_exception=False) from None
        tab = self.tabs[recipe.task]
        updates: dict = {self.tabs_block: gr.Tabs(selected=recipe.task), tab.prompt: recipe.prompt}
        for key, value in recipe.values.items():
            updates[tab.fields[key]] = value
        if recipe.model is not None:
            updates[self.model_picker] = recipe.model
        if recipe.task == "img2img" and recipe.init_img is not None:
            updates[tab.image] = open_image(recipe.init_img).convert("RGB")
        if recipe.task == "inpaint" and recipe.init_img is not None:
            background = open_image(recipe.init_img).convert("RGBA")
            layers = []
            if recipe.mask is not None:
                mask = open_image(recipe.mask).convert("L").resize(background.size)
                layer = Image.new("RGBA", background.size, (255, 255, 255, 0))
                layer.putalpha(mask)
                layers = [layer]
            updates[tab.image] = {"background": background, "layers": layers, "composite": None}
        if recipe.missing:
            gr.Warning(f"not found here: {'; '.join(recipe.missing)}")
        return updates

    # ------------------------------------------------------------------ layout
    def _task_tab(self, task: str, sdxl: bool, defaults: dict[str, Any]) -> TaskTab:
        values = form.initial_values(task, defaults)
        models, loras, vaes = self.manager.names(), self.manager.names("lora"), self.manager.names("vae")
        fields = {f.name: f for f in form.fields(task)}
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="prompt", lines=2, placeholder="a handwritten digit seven",
                                    elem_id=f"{task}-prompt")
                image: Optional[gr.components.Component] = None
                if task == "img2img":
                    image = gr.Image(label="image", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                     format="png", elem_id=f"{task}-image")
                elif task == "inpaint":
                    image = gr.ImageEditor(label="image: paint the area to repaint", type="pil", image_mode="RGBA",
                                           sources=["upload", "clipboard"], format="png", layers=False,
                                           brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                          color_mode="fixed"),
                                           elem_id=f"{task}-image")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id=f"{task}-cancel")
                components = {}
                with gr.Group():
                    for name in form.field_names(task, ("main",)):
                        components[name] = _component(task, fields[name], values[name])
                with gr.Accordion("LoRA", open=False, visible="lora" in form.declaration.by_name(task)):
                    lora = gr.Dropdown(choices=[NONE, *loras], value=NONE, label="lora",
                                       info="a LoRA file of the models folders, added to the model for the run",
                                       elem_id=f"{task}-lora")
                    for name in form.field_names(task, ("lora",)):
                        components[name] = _component(task, fields[name], values[name])
                with gr.Accordion("SDXL", open=False, visible=sdxl) as sdxl_box:
                    refiner = gr.Dropdown(choices=[NONE, *models], value=NONE, label="refiner",
                                          info="an SDXL refiner that finishes each image (see refiner switch, "
                                               "refiner strength)")
                    for name in form.field_names(task, ("sdxl",)):
                        components[name] = _component(task, fields[name], values[name])
                with gr.Accordion("Advanced", open=False):
                    vae = gr.Dropdown(choices=[NONE, *vaes], value=NONE, label="vae",
                                      info=form.declaration.by_name(task)["vae"].spec.help)
                    for name in form.field_names(task, ("advanced",)):
                        components[name] = _component(task, fields[name], values[name])
            with gr.Column(scale=2):
                preview = gr.Image(label="preview (the current denoised estimate)", type="pil", interactive=False,
                                   format="png", height=200, elem_id=f"{task}-preview")
                status = gr.Markdown(elem_id=f"{task}-status")
                gallery = gr.Gallery(label="images (PNG files with their recipe)", columns=4, format="png",
                                     buttons=["download", "fullscreen"], interactive=False, object_fit="contain",
                                     height=420, elem_id=f"{task}-gallery")
        tab = TaskTab(task, prompt, image, components, refiner, vae, lora, sdxl_box, preview, status, gallery,
                      generate, cancel)
        tab.inputs = {"model": self.model_picker, "prompt": prompt, **({"image": image} if image else {}),
                      "refiner": refiner, "vae": vae, "lora_file": lora, **components}
        return tab

    def build(self) -> gr.Blocks:
        defaults = self.manager.sampling_defaults(self.current)
        sdxl = self.manager.is_sdxl(self.current)
        with gr.Blocks(title="ldm web UI", analytics_enabled=False) as page:
            gr.Markdown("## ldm web UI: txt2img, img2img, inpainting")
            with gr.Row():
                self.model_picker = gr.Dropdown(choices=self.manager.names(), value=self.current, label="model",
                                                info="checkpoints of the models folders; one is loaded at a time",
                                                scale=4, elem_id="model")
                refresh = gr.Button("Refresh list", scale=1)
                self.model_status = gr.Markdown(f"loaded **{self.current}**", elem_id="model-status")
            with gr.Tabs() as self.tabs_block:
                for task in form.TASKS:
                    with gr.Tab(task, id=task):
                        self.tabs[task] = self._task_tab(task, sdxl, defaults)
                with gr.Tab("PNG info", id="png-info"):
                    png = gr.File(label="a PNG written by ldm", file_types=[".png"], type="filepath")
                    parameters = gr.Textbox(label="parameters", interactive=False, lines=2)
                    meta = gr.JSON(label="recipe")
                    send = gr.Button("Send to its tab", variant="primary")
            for task, tab in self.tabs.items():
                names = list(tab.inputs)
                body = (lambda t: lambda request, progress, values: self._generate(t, request, progress, values))(task)
                event = tab.generate.click(_handler(names, body), inputs_kwargs=tab.inputs,
                                           outputs=[tab.preview, tab.gallery, tab.status], api_name=task,
                                           concurrency_limit=1, concurrency_id=MODEL_QUEUE)
                tab.cancel.click(self.cancel, outputs=tab.status, cancels=[event], queue=False,
                                 api_name=f"{task}_cancel")
            outputs = [self.model_status, *[t.sdxl for t in self.tabs.values()]]
            self.model_picker.change(self.switch_model, inputs=self.model_picker, outputs=outputs,
                                     concurrency_limit=1, concurrency_id=MODEL_QUEUE, api_name="switch_model")
            default_outputs = [c for t in self.tabs.values() for n, c in t.fields.items()
                               if n in form.model_default_values(t.task, {})]
            self.model_picker.input(self.model_defaults, inputs=self.model_picker, outputs=default_outputs,
                                    api_visibility="private")
            refresh_outputs = [self.model_picker, *[c for t in self.tabs.values()
                                                    for c in (t.refiner, t.vae, t.lora)]]
            refresh.click(self.refresh, outputs=refresh_outputs, api_visibility="private")
            png.change(self.png_info, inputs=png, outputs=[parameters, meta], api_name="png_info")
            send_outputs = [self.tabs_block, self.model_picker,
                            *[c for t in self.tabs.values() for c in (t.prompt, *t.fields.values())],
                            *[t.image for t in self.tabs.values() if t.image is not None]]
            send.click(self.send_recipe, inputs=png, outputs=send_outputs, api_name="send_recipe")
        return page


def _union(layers: list[Image.Image]) -> Image.Image:
    """One RGBA layer holding every drawn pixel of ``layers``."""
    out = layers[0].convert("RGBA")
    for layer in layers[1:]:
        out = Image.alpha_composite(out, layer.convert("RGBA").resize(out.size))
    return out


def build_app(manager: ModelManager, options: Options) -> gr.Blocks:
    return WebUI(manager, options).build()
