"""diffusers-format folders load through the same detect -> registry -> strict load path as single files.

Each tiny original-layout file (tests.builders.sd_v1, sd2, x4) is converted by diffusers' own
single-file converters into diffusers models, saved with ``save_pretrained`` as a pipeline folder,
and read back by our reverse key map: the result must equal the single file's tensors exactly, be
detected as the same preset, and generate the same latents.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTokenizer

from ldm.checkpoints.catalog import checkpoint_files, scan
from ldm.checkpoints.detect import detect, detect_file
from ldm.checkpoints.diffusers_folder import (
    clip_to_original,
    open_clip_to_original,
    read_folder_shapes,
    read_folder_state,
    unet_to_original,
    unused_text_keys,
    vae_to_original,
)
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.inspect import inspect_target
from ldm.checkpoints.io import read_state_dict
from ldm.checkpoints.loader import build_model, load_model
from ldm.checkpoints.original_config import original_config as written_original_config
from ldm.checkpoints.presets import find_preset, list_presets
from ldm.models.clip import OpenCLIPTextEncoderConfig
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents
from tests.builders import sd2, sd_v1, x4
from tests.builders.sd2 import converted_text_model, original_v2_config
from tests.builders.sd_v1 import SCALE_FACTOR, original_config
from tests.builders.x4 import MAX_NOISE_LEVEL, original_x4_config
from tests.builders.x4 import SCALE_FACTOR as X4_SCALE_FACTOR
from tests.builders.x4 import SCHEDULE as X4_SCHEDULE
from tests.helpers import diffusers_clip_text_model

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).parent / "fixtures"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPEN_CLIP_TOKENS = "cond_stage_model.model.token_embedding.weight"
UNUSED_TEXT = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}


# ---------------------------------------------------------------- tiny pipelines from tiny single files


def diffusers_parts(path: Path, ours, config: dict, scale_factor: float, text_kind: str) -> dict:
    """diffusers' UNet, VAE and transformers' text model made from a single file by diffusers' converters."""
    checkpoint = read_state_dict(path)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=scale_factor)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    text = diffusers_clip_text_model(ours, checkpoint) if text_kind == "clip" else converted_text_model(ours, checkpoint)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def ddim(prediction_type: str, start: float = 0.00085, end: float = 0.012) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def save_pipeline(pipeline, folder: Path, vocab: Path, **options) -> Path:
    """``save_pretrained``, with the tokenizer as published folders hold it: vocab.json and merges.txt
    (transformers 5 writes only a tokenizer.json)."""
    pipeline.save_pretrained(folder, **options)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab / name, folder / "tokenizer" / name)
    return folder


@dataclasses.dataclass
class Case:
    single: Path  # the original single file
    folder: Path  # the same model as a diffusers folder
    ours: object  # the single file loaded by us
    preset: object
    tokenizer_dir: Path


def make_case(root: Path, kind: str) -> Case:
    if kind == "v1":
        files = sd_v1.write(root)
        config, scale, text_kind, prediction = original_config(), SCALE_FACTOR, "clip", "epsilon"
    elif kind == "x4":
        files = x4.write(root)
        config, scale, text_kind, prediction = original_x4_config(), X4_SCALE_FACTOR, "open_clip", "v_prediction"
    else:
        parameterization = "eps" if kind in ("v2-eps", "v2-inpainting") else "v"
        files = sd2.write(root, parameterization=parameterization, inpainting=kind == "v2-inpainting")
        config = original_v2_config(parameterization, inpainting=kind == "v2-inpainting")
        scale, text_kind = SCALE_FACTOR, "open_clip"
        prediction = "epsilon" if parameterization == "eps" else "v_prediction"
    path, tokenizer_dir, preset = files.path, files.tokenizer_dir, files.preset
    ours = files.load()
    parts = diffusers_parts(path, ours, config, scale, text_kind)
    parts["tokenizer"] = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    if kind == "x4":
        start, end = X4_SCHEDULE["linear_start"], X4_SCHEDULE["linear_end"]
        low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule="scaled_linear")
        pipeline = StableDiffusionUpscalePipeline(**parts, low_res_scheduler=low_res, scheduler=ddim(prediction, start, end),
                                                  max_noise_level=MAX_NOISE_LEVEL)
    else:
        cls = StableDiffusionInpaintPipeline if kind == "v2-inpainting" else StableDiffusionPipeline
        pipeline = cls(**parts, scheduler=ddim(prediction), safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False)
    folder = save_pipeline(pipeline, root / f"{kind}-diffusers", tokenizer_dir)
    return Case(path, folder, ours, preset, tokenizer_dir)


def registry(case_presets: dict) -> list:
    """The tiny presets, each with a detect section as a registry preset has (v2 eps and v share shapes)."""
    v1, v2_eps, v2_v, inpainting, x4 = (case_presets[k] for k in ("v1", "v2-eps", "v2-v", "v2-inpainting", "x4"))
    vocab = v1.model.cond_stage.vocab_size

    def detecting(preset, channels, tokens, predictions=None):
        extra = {"detect_prediction": predictions} if predictions else {}
        return dataclasses.replace(preset, detect={UNET_IN: (32, channels, 3, 3), tokens: (vocab, 32)}, **extra)

    return [
        detecting(v1, 4, CLIP_TOKENS),
        detecting(v2_eps, 4, OPEN_CLIP_TOKENS, ("eps",)),
        detecting(v2_v, 4, OPEN_CLIP_TOKENS, ("v", "unstated")),
        detecting(inpainting, 9, OPEN_CLIP_TOKENS, ("eps", "unstated")),
        detecting(x4, 7, OPEN_CLIP_TOKENS),
    ]


KINDS = ("v1", "v2-eps", "v2-v", "v2-inpainting", "x4")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    return {kind: make_case(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


@pytest.fixture(scope="module")
def presets(cases) -> list:
    return registry({kind: case.preset for kind, case in cases.items()})


def preset_named(presets, name):
    return next(p for p in presets if p.name == name)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
def test_folder_is_detected_as_the_single_files_preset(cases, presets, kind):
    case = cases[kind]
    detection = detect_file(case.folder, presets)
    assert detection.preset.name == case.preset.name
    assert detection.notice == ""  # the scheduler states the prediction type, so nothing is assumed
    assert detect_file(case.single, presets).preset.name == case.preset.name or kind == "v2-eps"


@pytest.mark.parametrize("kind", KINDS)
def test_folder_tensors_equal_the_single_files(cases, kind):
    """The round trip original -> diffusers' converters -> save_pretrained -> our reverse map is exact."""
    case = cases[kind]
    expected = set(case.ours.model.state_dict())
    single = {k: v for k, v in read_state_dict(case.single).items() if k in expected}
    folder = read_folder_state(case.folder)
    missing = set(single) - set(folder)
    if kind == "v1":
        assert missing == set()
    else:  # diffusers keeps the blocks SD 2 runs: the last OpenCLIP block and the projections are not saved
        last = max(int(k.split(".")[4]) for k in single if ".resblocks." in k)
        assert missing == UNUSED_TEXT | {k for k in single if f".resblocks.{last}." in k}
    assert set(folder) <= set(single)
    for key, tensor in folder.items():
        assert tensor.dtype == single[key].dtype and torch.equal(tensor, single[key]), key
    shapes = read_folder_shapes(case.folder)
    assert shapes == {k: tuple(v.shape) for k, v in folder.items()}


@pytest.mark.parametrize("kind", ["v1", "v2-v"])
@torch.no_grad()
def test_folder_model_generates_what_the_single_file_does(cases, presets, kind):
    case = cases[kind]
    loaded = load_model(case.folder, preset=preset_named(presets, case.preset.name))
    assert loaded.preset.name == case.preset.name and loaded.name == f"{kind}-diffusers"
    expected_fill = set() if kind == "v1" else UNUSED_TEXT
    assert expected_fill <= set(loaded.report.filled) and ("filled" in loaded.report.summary()) == (kind != "v1")
    # The folder's own tokenizer is used (the single file's tokenizer folder is elsewhere).
    assert loaded.model.cond_stage_model.tokenizer("a red cat").input_ids == case.ours.model.cond_stage_model.tokenizer("a red cat").input_ids
    request = GenerationRequest("a red cat", "a blue dog", steps=3, scale=7.5, eta=0.0, seed=7, width=16, height=16)
    assert torch.equal(sample_latents(loaded, request), sample_latents(case.ours, request))
    assert len(loaded.short_hash) == 10


def test_sd2_filled_text_block_is_an_identity(cases, presets):
    """The zeros that stand for the OpenCLIP block diffusers does not save leave the tower's output
    unchanged, whichever block it is read at."""
    loaded = load_model(cases["v2-v"].folder, preset=preset_named(presets, "tiny-v2-v"))
    encoder = loaded.model.cond_stage_model
    last = encoder.model.transformer.resblocks[-1]
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(last(x), x)


def test_inpainting_and_x4_folders_load_strictly(cases, presets):
    for kind in ("v2-inpainting", "x4"):
        case = cases[kind]
        loaded = load_model(case.folder, preset=preset_named(presets, case.preset.name))
        theirs = case.ours.model.state_dict()
        for key, tensor in loaded.model.state_dict().items():
            if key not in loaded.report.filled:
                assert torch.equal(tensor, theirs[key]), key


def test_bin_and_fp16_variant_folders(cases, presets, tmp_path):
    """.bin pickles are read by the safe loader; an fp16 variant alone is read in fp16."""
    case = cases["v1"]
    pipeline = StableDiffusionPipeline.from_pretrained(case.folder, safety_checker=None, requires_safety_checker=False)
    pickled = save_pipeline(pipeline, tmp_path / "bin", case.tokenizer_dir, safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))
    single = read_folder_state(case.folder)
    assert all(torch.equal(v, single[k]) for k, v in read_folder_state(pickled).items())
    assert detect_file(pickled, presets).preset.name == "tiny-v1"

    half = save_pipeline(pipeline.to(torch.float16), tmp_path / "fp16", case.tokenizer_dir, variant="fp16")
    assert (half / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    state = read_folder_state(half)
    assert all(v.dtype == torch.float16 and torch.equal(v, single[k].half()) for k, v in state.items())
    loaded = load_model(half, preset=preset_named(presets, "tiny-v1"))
    assert loaded.report.tensors == len(single)


def test_prediction_type_comes_from_the_scheduler(cases, presets, tmp_path):
    folder = shutil.copytree(cases["v2-v"].folder, tmp_path / "copy")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "epsilon"
    config_path.write_text(json.dumps(config))
    assert detect_file(folder, presets).preset.name == "tiny-v2-eps"
    del config["prediction_type"]
    config_path.write_text(json.dumps(config))
    detection = detect_file(folder, presets)
    assert detection.preset.name == "tiny-v2-v" and "tiny-v2-eps" in detection.notice
    assert "scheduler/scheduler_config.json" in detection.notice and ".yaml" not in detection.notice


def test_inspect_names_the_folders_family(cases, presets, monkeypatch):
    monkeypatch.setattr("ldm.checkpoints.inspect.list_presets", lambda: presets)
    report = inspect_target(str(cases["v1"].folder))
    assert report.preset.name == "tiny-v1" and "tiny SD v1 layout" in report.describe()
    assert report.metadata["pipeline"] == "StableDiffusionPipeline"
    assert report.shapes[UNET_IN] == (32, 4, 3, 3)


# ---------------------------------------------------------------- errors


def copy_of(case: Case, tmp_path: Path) -> Path:
    return shutil.copytree(case.folder, tmp_path / case.folder.name)


def test_missing_component_is_named(cases, presets, tmp_path):
    folder = copy_of(cases["v1"], tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"lacks the component\(s\) vae of its StableDiffusionPipeline"):
        detect_file(folder, presets)


def test_unsupported_pipeline_names_the_supported_ones(cases, presets, tmp_path):
    folder = copy_of(cases["v1"], tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="StableDiffusion3Pipeline.*Supported pipelines: StableDiffusionPipeline, "
                       "StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLPipeline, "
                       "StableDiffusionXLImg2ImgPipeline"):
        load_model(folder, preset=preset_named(presets, "tiny-v1"))


def test_a_key_that_does_not_map_names_its_file(cases, presets, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(cases["v1"], tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["down_blocks.0.mystery.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=f"{weights}.*'down_blocks.0.mystery.weight'"):
        detect_file(folder, presets)


def test_x4_vae_scale_is_the_presets_whatever_its_config_says(cases, presets, tmp_path):
    """diffusers' upscale pipeline also uses 0.08333, as published x4 VAE configs lacked the setting."""
    folder = copy_of(cases["x4"], tmp_path)
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.18215
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, preset=preset_named(presets, "tiny-x4"))
    assert loaded.model.config.scale_factor == X4_SCALE_FACTOR


def test_sd_vae_scale_must_be_the_presets(cases, presets, tmp_path):
    folder = copy_of(cases["v1"], tmp_path)
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.13025
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="scaling_factor 0.13025, but preset tiny-v1 has 0.18215"):
        load_model(folder, preset=preset_named(presets, "tiny-v1"))


def test_folder_without_model_index_and_mismatched_schedule(cases, presets, tmp_path):
    with pytest.raises(CheckpointError, match="without model_index.json"):
        detect_file(tmp_path, presets)
    folder = copy_of(cases["v1"], tmp_path)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["beta_end"] = 0.02
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="linear_end 0.02 .preset: 0.012."):
        load_model(folder, preset=preset_named(presets, "tiny-v1"))


def test_catalog_lists_a_folder_once(cases, presets, tmp_path):
    shutil.copytree(cases["v1"].folder, tmp_path / "models" / "tiny-sd")
    shutil.copy(cases["v1"].single, tmp_path / "models" / "single.safetensors")
    files = checkpoint_files([tmp_path / "models"])
    assert [p.name for p in files] == ["single.safetensors", "tiny-sd"]
    entries = scan([tmp_path / "models"], presets)
    assert [(e.name, e.preset.name) for e in entries] == [("single", "tiny-v1"), ("tiny-sd", "tiny-v1")]
    assert checkpoint_files([tmp_path / "models" / "tiny-sd"]) == [(tmp_path / "models" / "tiny-sd").resolve()]


# ---------------------------------------------------------------- full-size layouts, on the meta device

FULL_SIZE = [("v1-inference", "eps"), ("v2-inference", "eps"), ("v2-inference-v", "v"),
             ("v2-inpainting-inference", "eps"), ("x4-upscaling", "v")]


@pytest.mark.parametrize("name,prediction", FULL_SIZE)
def test_full_size_folder_layouts_map_back_to_the_presets_keys(name, prediction):
    """The registry presets' own keys (pinned to the originals by test_key_contract), taken through
    diffusers' converters with the original configs, as diffusers' folders hold them (SD 2's text model
    one block shorter, without the projection), come back as those keys and are detected as the preset."""
    preset = find_preset(name)
    original = build_model(preset.model).state_dict()  # meta tensors: shapes only
    config = written_original_config(preset.model)  # the original YAML's structure, as diffusers' converters read it
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, original)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, original)
    unet = sfu.convert_ldm_unet_checkpoint(original, unet_config)
    vae = sfu.convert_ldm_vae_checkpoint(original, vae_config)
    if isinstance(preset.model.cond_stage, OpenCLIPTextEncoderConfig):
        text = sfu.convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=1024)), original)
        text = {k: v for k, v in text.items() if not k.startswith("text_model.encoder.layers.23.") and k != "text_projection.weight"}
        text = open_clip_to_original(text, Path("text_encoder"))
    else:
        text = clip_to_original(sfu.convert_ldm_clip_checkpoint(original), Path("text_encoder"))
    ours = {**unet_to_original(unet, unet_config["layers_per_block"], Path("unet")),
            **vae_to_original(vae, len(vae_config["up_block_types"]), Path("vae")), **text}
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    assert shapes == {k: tuple(v.shape) for k, v in original.items() if k in shapes}
    assert set(original) - set(shapes) == unused_text_keys(preset.model)
    assert len(unused_text_keys(preset.model)) == (0 if name == "v1-inference" else 14)
    detection = detect(shapes, list_presets(), name, prediction)
    assert (detection.preset.name, detection.notice) == (name, "")


@pytest.mark.parametrize("file,key,value,message", [
    ("model_index.json", "max_noise_level", 250, "max_noise_level 250, but preset tiny-x4 has 350"),
    ("low_res_scheduler/scheduler_config.json", "beta_schedule", "linear", "kind 'sqrt_linear' .preset: 'linear'."),
])
def test_x4_folder_settings_must_be_the_presets(cases, presets, tmp_path, file, key, value, message):
    folder = copy_of(cases["x4"], tmp_path)
    config = json.loads((folder / file).read_text())
    config[key] = value
    (folder / file).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, preset=preset_named(presets, "tiny-x4"))


# ---------------------------------------------------------------- SDXL: two text encoders, add_embedding


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_an_sdxl_folder_reads_back_to_the_single_files_tensors_and_loads(kind, tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    from tests.builders import sdxl

    files = tiny_sdxl if kind == "base" else tiny_sdxl_refiner
    folder = sdxl.write_diffusers_folder(files, tmp_path / f"sdxl-{kind}", kind)
    original = read_state_dict(files.path)
    logit_scale = f"conditioner.embedders.{1 if kind == 'base' else 0}.model.logit_scale"
    state = read_folder_state(folder)
    assert sorted(state) == sorted(k for k in original if k != logit_scale)
    assert [k for k in state if not torch.equal(state[k], original[k])] == []
    assert read_folder_shapes(folder) == {k: tuple(v.shape) for k, v in state.items()}
    loaded = load_model(folder, preset=files.preset)  # its own tokenizer folder
    assert loaded.report.filled == (logit_scale,)
    ours = loaded.model.state_dict()
    assert [k for k in state if not torch.equal(ours[k], state[k])] == []
    # its own tokenizer folder reads prompts as the single file's tokenizer does
    prompts = ["a (red:1.2) cat", "the blue house"]
    assert torch.equal(loaded.model.conditioner.encode_text(prompts).context,
                       files.load().model.conditioner.encode_text(prompts).context)


def test_an_sdxl_refiner_folder_has_no_first_text_encoder_and_reads_tokenizer_2(tiny_sdxl_refiner, tmp_path):
    from ldm.checkpoints.diffusers_folder import open_folder
    from tests.builders import sdxl

    folder = open_folder(sdxl.write_diffusers_folder(tiny_sdxl_refiner, tmp_path / "refiner", "refiner"))
    assert folder.text_encoders == ("text_encoder_2",)
    assert folder.tokenizer_dir == folder.root / "tokenizer_2"
