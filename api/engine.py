"""The API's side of the studio: AUTOMATIC1111 requests turned into the engine's requests and run by
the tasks of ``ldm/`` on the studio's ``Studio`` (its model cache and per-model locks, memory budget,
LoRA and embedding folders, outputs writer), so an API client and a studio user share one engine.

API generations run one at a time, as AUTOMATIC1111's queue lock runs them, and each holds the
model's lock that the studio's tabs hold, so neither runs a model the other is using. The API has
its own interrupt and skip flags: an API client never stops a studio session's job, nor the reverse.
An interrupted (or skipped) batch returns what it had: the sampler's estimate of the clean image at
its last step. Progress (``progress()``) is kept here for ``/progress``, which answers while a job runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from api import codec, schema
from ldm.checkpoints.catalog import CatalogEntry
from ldm.sampling.samplers import SAMPLERS, split_sampler_name
from ldm.sampling.sigmas import SCHEDULES
from ldm.sampling.steps import SamplingCancelled, StepInfo
from ldm.tasks import hires as hires_task
from ldm.tasks import img2img as img2img_task
from ldm.tasks import inpaint as inpaint_task
from ldm.tasks import txt2img as txt2img_task
from ldm.tasks import upscale as upscale_task
from ldm.tasks.generate import decode
from ldm.tasks.images import as_rgb, to_pil
from ldm.tasks.masked import FILL_MODES
from ldm.tasks.parameters import parameters_text
from ldm.tasks.preview import preview_image
from ldm.tasks.request import (
    MAX_BATCH,
    MAX_SEED,
    GenerationRequest,
    TilingOptions,
    checked_number,
    resolve_request,
)
from ui.services import Studio

log = logging.getLogger(__name__)

MAX_N_ITER = 16
VERSION = "ldm-studio"
DEFAULT_SAMPLER = "Euler"  # AUTOMATIC1111's sampler_index default, and its fallback for an unknown name
# AUTOMATIC1111's aliases of the samplers the engine has (modules/sd_samplers_kdiffusion.py).
SAMPLER_ALIASES = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "Heun": ["k_heun"],
    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ SDE": ["k_dpmpp_sde"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DDIM": ["ddim"], "UniPC": ["unipc"], "LCM": ["k_lcm", "lcm"],
}
RESIZE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_UPSCALE = 8.0


def scheduler_name(label: str) -> str:
    """AUTOMATIC1111's name of a schedule: "SGM Uniform" -> "sgm_uniform"."""
    return label.lower().replace(" ", "_")


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str, list[str]]:
    """(sampler, schedule, notices) for AUTOMATIC1111's names: a sampler by name, alias or a fused
    "DPM++ 2M Karras"; a scheduler by name ("karras") or label ("Karras"). As AUTOMATIC1111 does, an
    unknown sampler runs the default one, and an unknown scheduler "Automatic"; a notice says so."""
    notices = []
    aliases = {alias: sampler for sampler, names in SAMPLER_ALIASES.items() for alias in names}
    label = (name or DEFAULT_SAMPLER).strip()
    fused = None
    if label in aliases:
        sampler = aliases[label]
    else:
        try:
            sampler, fused = split_sampler_name(label)
        except ValueError:
            sampler = DEFAULT_SAMPLER
            notices.append(f"sampler {label!r} is not available; {DEFAULT_SAMPLER} was used (available: "
                           f"{', '.join(SAMPLERS)})")
    schedules = {scheduler_name(s): s for s in SCHEDULES} | {s.lower(): s for s in SCHEDULES} | {"sgmuniform": "SGM Uniform"}
    schedule = fused or "Automatic"
    if scheduler:
        found = schedules.get(scheduler.strip().lower())
        if found is None:
            notices.append(f"scheduler {scheduler!r} is not available; Automatic was used (available: "
                           f"{', '.join(scheduler_name(s) for s in SCHEDULES)})")
        elif not (found == "Automatic" and fused):
            schedule = found
    return sampler, schedule, notices


# The engine's names of request fields, as AUTOMATIC1111's requests name them.
FIELD_NAMES = {"hires upscale factor": "hr_scale", "hires width": "hr_resize_x", "hires height": "hr_resize_y",
               "hires steps": "hr_second_pass_steps", "guidance scale": "cfg_scale", "batch size": "batch_size", "s_noise (sigma noise)": "s_noise",
               "prompt and negative prompt": "prompt and negative_prompt", "denoising strength": "denoising_strength",
               "mask feather": "mask_blur", "masked area padding": "inpaint_full_res_padding"}


@contextlib.contextmanager
def api_field_names():
    """Re-raise the engine's ValueErrors with the request's own field names ("cfg_scale must be ...")."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        for ours, theirs in FIELD_NAMES.items():
            if message.startswith(ours):
                raise ValueError(theirs + message[len(ours):]) from None
        raise


def unsupported_notices(body: schema.Generation) -> list[str]:
    """What a request asks for that the engine does not do: it runs without, and says so."""
    asked = [("subseed_strength", body.subseed_strength not in (0, None)), ("restore_faces", bool(body.restore_faces)),
             ("tiling (seamless textures)", bool(body.tiling)), ("styles", bool(body.styles)),
             ("script_name", bool(body.script_name)), ("alwayson_scripts", bool(body.alwayson_scripts)),
             ("refiner_checkpoint", bool(body.refiner_checkpoint)), ("s_churn", bool(body.s_churn)),
             ("infotext", bool(body.infotext))]
    if isinstance(body, schema.Img2Img):
        asked.append(("initial_noise_multiplier", body.initial_noise_multiplier not in (None, 1, 1.0)))
    if isinstance(body, schema.Txt2Img) and body.enable_hr:
        asked += [("hr_checkpoint_name", bool(body.hr_checkpoint_name)), ("hr_sampler_name", bool(body.hr_sampler_name)),
                  ("hr_scheduler", bool(body.hr_scheduler)), ("hr_prompt", bool(body.hr_prompt)),
                  ("hr_negative_prompt", bool(body.hr_negative_prompt))]
    return [f"{name} is not supported by this server and was not applied" for name, given in asked if given]


@dataclass
class Outcome:
    """What a job made: images with their seeds and parameters texts, and notices."""

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


@dataclass
class Progress:
    """AUTOMATIC1111's ``shared.state`` as ``/progress`` reports it."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    job_timestamp: str = "0"
    textinfo: str | None = None
    started: float = 0.0
    preview: Image.Image | None = None
    interrupted: bool = False
    skipped: bool = False


class ApiEngine:
    """The API's engine over a studio. ``options`` is the dict of ``/options`` (any key a client posts
    is kept); its ``sd_model_checkpoint`` is the title of the model the API uses."""

    def __init__(self, studio: Studio, flags: dict | None = None):
        self.studio = studio
        self.flags = dict(flags or {})
        self.queue = threading.Lock()  # API generations one at a time
        self.interrupt_flag = threading.Event()
        self.skip_flag = threading.Event()
        self._progress = Progress()
        self._progress_lock = threading.Lock()
        default = studio.default_for("txt2img")
        self.checkpoint: Path | None = Path(default).resolve() if default else None
        self.options: dict = {"samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
                              "sd_checkpoint_hash": None, "live_previews_enable": True}

    # models ---------------------------------------------------------------------------------------

    def checkpoints(self) -> list[CatalogEntry]:
        """The models ``/sd-models`` lists: those that generate from a prompt."""
        return [e for e in self.studio.catalog() if e.preset is not None and txt2img_task.serves(e.preset.model) is None]

    def upscalers(self) -> list[CatalogEntry]:
        return [e for e in self.studio.catalog() if e.preset is not None and upscale_task.serves(e.preset.model) is None]

    @staticmethod
    def title(entry: CatalogEntry) -> str:
        return entry.path.name

    def model_hash(self, path: Path) -> str | None:
        """The short hash of a model already loaded (hashing a large file that is not is left for later)."""
        loaded = self.studio.models.loaded(path)
        return loaded.short_hash if loaded is not None else None

    def find_checkpoint(self, name) -> CatalogEntry:
        """A model by any of AUTOMATIC1111's aliases: title, title with " [hash]", model name, stem."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("sd_model_checkpoint must be a model's title from /sdapi/v1/sd-models")
        wanted = name.strip()
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        for entry in self.checkpoints():
            if wanted in (self.title(entry), entry.name, str(entry.path)) or bare in (self.title(entry), entry.name):
                return entry
        titles = ", ".join(self.title(e) for e in self.checkpoints()) or "none: put a checkpoint in weights/"
        raise ValueError(f"model {wanted!r} not found; models: {titles}")

    def current_title(self) -> str | None:
        return self.checkpoint.name if self.checkpoint else None

    def set_checkpoint(self, name) -> None:
        """Switch the API's model, loading it now (blocks until loaded, after any running API job)."""
        entry = self.find_checkpoint(name)
        with self.queue:
            self.studio.models.get(entry.path)
            self.checkpoint = entry.path
            self.options["sd_checkpoint_hash"] = self.model_hash(entry.path)

    def unload(self) -> None:
        """Free the API's model (AUTOMATIC1111's unload-checkpoint, used to hand the GPU to another program)."""
        with self.queue:
            if self.checkpoint is not None:
                self.studio.models.unload(self.checkpoint)

    def reload(self) -> None:
        with self.queue:
            if self.checkpoint is not None:
                self.studio.models.get(self.checkpoint)

    def loaded_for(self, body: schema.Generation, serves: Callable, task: str):
        """The model a generation runs on: its override_settings' checkpoint, else the current one."""
        override = (body.override_settings or {}).get("sd_model_checkpoint")
        if override:
            path = self.find_checkpoint(override).path
        elif self.checkpoint is None:
            raise ValueError("no text-to-image model is installed; put a checkpoint in weights/ and call "
                             "/sdapi/v1/refresh-checkpoints")
        else:
            path = self.checkpoint
        entry = self.studio.entry(path)
        reason = serves(entry.preset.model)
        if reason is not None:
            raise ValueError(f"{entry.name} cannot do {task}: it {reason}")
        return self.studio.models.get(path)

    # progress, interrupt, skip --------------------------------------------------------------------

    def progress(self, skip_current_image: bool = False) -> dict:
        with self._progress_lock:
            p = self._progress
            state = {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False, "job": p.job,
                     "job_count": p.job_count, "job_timestamp": p.job_timestamp, "job_no": p.job_no,
                     "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps}
            if p.job_count == 0:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": p.textinfo}
            fraction = 0.01 + p.job_no / p.job_count
            if p.sampling_steps:
                fraction += p.sampling_step / p.sampling_steps / p.job_count
            fraction = min(fraction, 1.0)
            elapsed = time.monotonic() - p.started
            preview = None if skip_current_image else p.preview
            textinfo = p.textinfo
        image = codec.encode_png(preview) if preview is not None else None
        return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed, "state": state,
                "current_image": image, "textinfo": textinfo}

    def _update(self, **changes) -> None:
        with self._progress_lock:
            for key, value in changes.items():
                setattr(self._progress, key, value)

    def interrupt(self) -> None:
        self._update(interrupted=True)
        self.interrupt_flag.set()

    def skip(self) -> None:
        self._update(skipped=True)
        self.skip_flag.set()

    # generation -----------------------------------------------------------------------------------

    def request_from(self, body: schema.Generation, loaded) -> tuple[GenerationRequest, int, list[str]]:
        """The engine's request (checked now, before any wait), the number of batches and notices."""
        sampler, schedule, notices = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler)
        eta = SAMPLERS[sampler].eta_default if body.eta is None else body.eta
        request = GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, scale=body.cfg_scale, eta=eta,
            sampler=sampler, schedule=schedule, s_noise=1.0 if body.s_noise is None else body.s_noise, seed=body.seed,
            width=body.width, height=body.height, batch_size=body.batch_size,
            tiling=TilingOptions(budget_mb=self.studio.memory_budget_mb),
            lora_dirs=self.studio.lora_dirs(), embedding_dirs=self.studio.embedding_dirs())
        with api_field_names():
            resolve_request(request, loaded.model.config.size_multiple)
        n_iter = checked_number("n_iter (batch count)", body.n_iter, 1, MAX_N_ITER, integer=True)
        checked_number("batch_size", body.batch_size, 1, MAX_BATCH, integer=True)
        return request, n_iter, notices + unsupported_notices(body)

    def run(self, job: str, loaded, request: GenerationRequest, n_iter: int,
            work: Callable[[GenerationRequest, Callable, Callable], object]) -> Outcome:
        """Run ``work(request, callback, should_stop) -> GenerationResult`` ``n_iter`` times, seeds following
        on, under the API's queue and the model's lock. Interrupt ends the job and skip the batch, each
        keeping what it had."""
        outcome = Outcome()
        with self.queue:
            self.interrupt_flag.clear()
            self.skip_flag.clear()
            self._update(job=job, job_count=n_iter, job_no=0, sampling_step=0, sampling_steps=request.steps,
                         job_timestamp=dt.datetime.now().strftime("%Y%m%d%H%M%S"), started=time.monotonic(),
                         preview=None, interrupted=False, skipped=False, textinfo=None)
            try:
                self._run_batches(loaded, request, n_iter, work, outcome)
            finally:
                self._update(job="", job_count=0, job_no=0, sampling_step=0, sampling_steps=0, preview=None,
                             textinfo=None)
        return outcome

    def _run_batches(self, loaded, request, n_iter, work, outcome: Outcome) -> None:
        seed = random.randrange(MAX_SEED) if request.seed == -1 else int(request.seed)
        lock = self.studio.models.lock(loaded.path)
        while not lock.acquire(timeout=0.25):
            self._update(textinfo=f"Waiting for another generation with {loaded.name} to finish")
            if self.interrupt_flag.is_set():
                outcome.notices.append("interrupted while waiting for the model: nothing was generated")
                return
        self._update(textinfo=None)
        try:
            for batch in range(n_iter):
                if self.interrupt_flag.is_set():
                    break
                self.skip_flag.clear()
                self._update(job_no=batch, sampling_step=0, skipped=False)
                one = replace(request, seed=seed)
                last: list[StepInfo] = []

                def callback(info: StepInfo, last=last) -> None:
                    last[:] = [info]
                    picture = preview_image(loaded.model, info.denoised)
                    self._update(sampling_step=info.step + 1, sampling_steps=info.total, preview=picture)

                def should_stop() -> bool:
                    return self.interrupt_flag.is_set() or self.skip_flag.is_set()

                try:
                    result = work(one, callback, should_stop)
                except SamplingCancelled as cancelled:
                    self._keep_partial(loaded, one, cancelled, last, outcome)
                else:
                    outcome.images += result.images
                    outcome.seeds += result.seeds
                    outcome.texts += result.parameters
                    outcome.notices += [n for n in result.notices if n not in outcome.notices]
                seed = (seed + request.batch_size) % (MAX_SEED + 1)
        finally:
            lock.release()

    def _keep_partial(self, loaded, request, cancelled: SamplingCancelled, last: list[StepInfo], outcome: Outcome) -> None:
        """A stopped batch's images: its last step's estimate of the clean image, decoded."""
        why = "interrupted" if self.interrupt_flag.is_set() else "skipped"
        if not last:
            outcome.notices.append(f"batch {why} before its first step: it has no image")
            return
        with torch.inference_mode():
            images = to_pil(decode(loaded.model, last[0].denoised, request.tiling))
        outcome.notices.append(f"batch {why} after {cancelled.step} of {cancelled.total} steps: its images are the "
                               "sampler's estimate at that step, unfinished")
        for i, image in enumerate(images):
            seed = request.seed + i
            outcome.images.append(image)
            outcome.seeds.append(seed)
            outcome.texts.append(parameters_text(request, seed, loaded, {"Interrupted": f"{cancelled.step}/{cancelled.total} steps"},
                                                 size=f"{image.width}x{image.height}"))

    def save(self, outcome: Outcome, task: str, loaded) -> None:
        """Write the job's images to the studio's outputs folder, as the tabs do."""
        for image, seed, text in zip(outcome.images, outcome.seeds, outcome.texts):
            self.studio.writer.save(image, text, seed, {"task": task, "model": loaded.name, "source": "api"})

    def response(self, body: schema.Generation, outcome: Outcome, loaded, request: GenerationRequest, *,
                 denoising: float | None = None, inpainting: bool = False, hidden: tuple[str, ...] = ()) -> dict:
        """AUTOMATIC1111's response: images, the request echoed, and ``info`` as a JSON string."""
        n = len(outcome.images)
        seeds = outcome.seeds or [request.seed]
        width, height = outcome.images[0].size if outcome.images else (request.width, request.height)
        info = {
            "prompt": body.prompt, "all_prompts": [body.prompt] * n, "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * n, "seed": seeds[0], "all_seeds": outcome.seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": width, "height": height,
            "sampler_name": request.sampler, "scheduler": request.schedule, "cfg_scale": request.scale,
            "steps": request.steps, "batch_size": request.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": loaded.name, "sd_model_hash": loaded.short_hash,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": denoising, "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": outcome.texts, "styles": [], "job_timestamp": self._progress.job_timestamp, "clip_skip": 1,
            "is_using_inpainting_conditioning": inpainting and loaded.model.inpaints_natively, "version": VERSION,
            "notices": outcome.notices,
        }
        parameters = body.model_dump()
        for key in hidden:
            parameters[key] = None
        images = [codec.encode_png(i, t) for i, t in zip(outcome.images, outcome.texts)] if body.send_images else []
        return {"images": images, "parameters": parameters, "info": json.dumps(info, default=lambda o: None)}

    def txt2img(self, body: schema.Txt2Img) -> dict:
        loaded = self.loaded_for(body, txt2img_task.serves, "text to image")
        request, n_iter, notices = self.request_from(body, loaded)
        work = self.hires_work(body, loaded, request) if body.enable_hr else (
            lambda r, cb, stop: txt2img_task.txt2img(loaded, r, callback=cb, should_stop=stop))
        outcome = self.run("txt2img", loaded, request, n_iter, work)
        outcome.notices[:0] = notices
        if body.save_images:
            self.save(outcome, "txt2img", loaded)
        return self.response(body, outcome, loaded, request,
                             **({"denoising": body.denoising_strength} if body.enable_hr else {}))

    def hires_work(self, body: schema.Txt2Img, loaded, request: GenerationRequest) -> Callable:
        """txt2img with ``enable_hr``: ``ldm.tasks.hires`` with A1111's fields (hr_upscaler None is "Latent",
        as A1111's default latent mode; "Lanczos" and our super-resolution models by their /upscalers names),
        checked before the job is queued. The upscaling model is held by its lock while it runs."""
        name = body.hr_upscaler or "Latent"
        entry = None
        if name not in hires_task.UPSCALERS:
            entry = next((e for e in self.upscalers() if e.name == name), None)
            if entry is None:
                known = [*hires_task.UPSCALERS, *(e.name for e in self.upscalers())]
                raise ValueError(f"hr_upscaler {name!r} is not known; use one of {', '.join(known)}")
        upscaler = None if entry is None else self.studio.models.get(entry.path)
        with api_field_names():
            options = hires_task.HiresOptions(scale=body.hr_scale, width=body.hr_resize_x, height=body.hr_resize_y,
                                              upscaler=name, steps=body.hr_second_pass_steps,
                                              strength=body.denoising_strength).check(upscaler)
            hires_task.hires_size(request.width, request.height, options, loaded.model.config.size_multiple)
        if entry is None:
            return lambda r, cb, stop: hires_task.hires_fix(loaded, r, options, callback=cb, should_stop=stop)

        def work(r, cb, stop):
            with self.studio.models.lock(entry.path):
                return hires_task.hires_fix(loaded, r, options, upscaler=upscaler, callback=cb, should_stop=stop)

        return work

    def img2img(self, body: schema.Img2Img) -> dict:
        if not body.init_images:
            raise codec.ImageInputError("init_images is missing: send one picture (base64 or a data URL) in a list")
        picture = codec.decode_image(body.init_images[0], "init_images[0]")
        if not 0 <= body.resize_mode < len(img2img_task.RESIZE_MODES):
            raise ValueError(f"resize_mode must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill), got "
                             f"{body.resize_mode}; 3 (latent upscale) is not supported")
        mode = img2img_task.RESIZE_MODES[body.resize_mode]
        if body.mask:
            return self._inpaint(body, picture, mode)
        loaded = self.loaded_for(body, img2img_task.serves, "image to image")
        request, n_iter, notices = self.request_from(body, loaded)
        if len(body.init_images) > 1:
            notices.append("only the first of init_images is used")
        with api_field_names():
            options = img2img_task.Img2ImgOptions(strength=body.denoising_strength, resize_mode=mode).check()
        outcome = self.run("img2img", loaded, request, n_iter, lambda r, cb, stop: img2img_task.img2img(
            loaded, r, picture, options=options, callback=cb, should_stop=stop))
        outcome.notices[:0] = notices
        if body.save_images:
            self.save(outcome, "img2img", loaded)
        return self.response(body, outcome, loaded, request, denoising=options.strength,
                             hidden=() if body.include_init_images else ("init_images", "mask"))

    def _inpaint(self, body: schema.Img2Img, picture: Image.Image, mode: str) -> dict:
        """img2img with a mask: ``ldm.tasks.inpaint`` on the picture fitted to the request's size."""
        loaded = self.loaded_for(body, inpaint_task.serves, "inpainting")
        request, n_iter, notices = self.request_from(body, loaded)
        mask = codec.as_mask(codec.decode_image(body.mask, "mask"))
        if body.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
        blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
        if not 0 <= body.inpainting_fill < len(FILL_MODES):
            raise ValueError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                             f"got {body.inpainting_fill}")
        options = inpaint_task.InpaintOptions(feather=blur, only_masked=body.inpaint_full_res,
                                              padding=body.inpaint_full_res_padding, strength=body.denoising_strength,
                                              fill=FILL_MODES[body.inpainting_fill])
        with api_field_names():
            options.check()
        picture = img2img_task.resize_picture(as_rgb(picture), body.width, body.height, mode)  # sizes checked above
        mask = img2img_task.resize_picture(mask.convert("RGB"), picture.width, picture.height, mode).convert("L")
        outcome = self.run("img2img", loaded, request, n_iter, lambda r, cb, stop: inpaint_task.inpaint(
            loaded, r, picture, mask, options=options, callback=cb, should_stop=stop))
        outcome.notices[:0] = notices
        if body.save_images:
            self.save(outcome, "inpaint", loaded)
        return self.response(body, outcome, loaded, request, denoising=1.0, inpainting=True,
                             hidden=() if body.include_init_images else ("init_images", "mask"))

    # extras ---------------------------------------------------------------------------------------

    def upscaler_names(self) -> list[str]:
        return ["None", *RESIZE_UPSCALERS, *(e.name for e in self.upscalers())]

    def extras(self, body: schema.Extras, images: list[Image.Image]) -> tuple[list[Image.Image], list[str]]:
        """Upscale each image by ``upscaler_1`` (and blend ``upscaler_2``'s by its visibility)."""
        names = self.upscaler_names()
        for key in ("upscaler_1", "upscaler_2"):
            value = getattr(body, key) or "None"
            if value not in names:
                raise ValueError(f"{key} {value!r} is not an upscaler here; upscalers: {', '.join(names)}")
        checked_number("extras_upscaler_2_visibility", body.extras_upscaler_2_visibility, 0, 1)
        notices = []
        if body.gfpgan_visibility or body.codeformer_visibility:
            notices.append("face restoration (GFPGAN, CodeFormer) is not available here and was not applied")
        if body.resize_mode == 0:
            checked_number("upscaling_resize", body.upscaling_resize, 0.01, MAX_UPSCALE)
        elif body.resize_mode == 1:
            checked_number("upscaling_resize_w", body.upscaling_resize_w, 1, codec.MAX_IMAGE_SIDE, integer=True)
            checked_number("upscaling_resize_h", body.upscaling_resize_h, 1, codec.MAX_IMAGE_SIDE, integer=True)
        else:
            raise ValueError(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x h), "
                             f"got {body.resize_mode}")
        out = []
        for image in images:
            image = as_rgb(image)
            first = self._upscale(image, body.upscaler_1 or "None", body)
            second = body.upscaler_2 or "None"
            if second != "None" and body.extras_upscaler_2_visibility > 0:
                first = Image.blend(first, self._upscale(image, second, body).resize(first.size),
                                    body.extras_upscaler_2_visibility)
            out.append(first)
        return out, notices

    def _target(self, image: Image.Image, body: schema.Extras) -> tuple[int, int]:
        if body.resize_mode == 0:
            return max(1, round(image.width * body.upscaling_resize)), max(1, round(image.height * body.upscaling_resize))
        return body.upscaling_resize_w, body.upscaling_resize_h

    def _fit(self, image: Image.Image, size: tuple[int, int], body: schema.Extras) -> Image.Image:
        mode = "Crop and resize" if body.resize_mode == 1 and body.upscaling_crop else "Just resize"
        return img2img_task.resize_picture(image, *size, mode)

    def _upscale(self, image: Image.Image, name: str, body: schema.Extras) -> Image.Image:
        width, height = self._target(image, body)
        if max(width, height) > codec.MAX_IMAGE_SIDE:
            raise ValueError(f"the upscaled image would be {width}x{height}; at most {codec.MAX_IMAGE_SIDE} px a side")
        if name == "None":
            return image
        if name in RESIZE_UPSCALERS:
            if body.resize_mode == 1 and body.upscaling_crop:
                return self._fit(image, (width, height), body)
            return image.resize((width, height), RESIZE_UPSCALERS[name])
        entry = next(e for e in self.upscalers() if e.name == name)
        loaded = self.studio.models.get(entry.path)
        defaults = entry.preset.sampler
        request = GenerationRequest(prompt="", steps=defaults.steps, scale=defaults.scale, eta=defaults.eta,
                                    sampler=defaults.sampler, schedule=defaults.schedule,
                                    tiling=TilingOptions(budget_mb=self.studio.memory_budget_mb))
        picture = image
        while picture.width < width or picture.height < height:
            outcome = self.run("extras", loaded, request, 1, lambda r, cb, stop, p=picture: upscale_task.upscale(
                loaded, p, r, callback=cb, should_stop=stop))
            if not outcome.images:
                raise ValueError("the upscale was interrupted before it made an image")
            picture = outcome.images[0]
        return self._fit(picture, (width, height), body)
