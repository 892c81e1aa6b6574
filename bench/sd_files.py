"""Full-size Stable Diffusion files with random weights, and diffusers' pipeline built from such a
file, shared by the benchmarks that compare the CLI's path with diffusers' (``large_canvas.py``,
``speed.py``'s end-to-end part).

    .venv/bin/python bench/sd_files.py sd-v1     # write the file once (it is also written on first use)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = Path.home() / ".cache" / "ldm-studio" / "bench"
RANDOM_MODELS = {"sd-v1": "v1-inference", "sd-v2": "v2-inference-v"}


def random_model_file(name: str) -> Path:
    """The random-weight checkpoint of ``name`` in its original layout (fp16 safetensors: 2.1 GB for
    sd-v1, 2.6 GB for sd-v2), made once, in a process of its own: a child forked from a process that
    held the model would start with its resident memory, and Linux counts that in the child's peak
    (``ru_maxrss``)."""
    path = CACHE / f"{name}-random-fp16.safetensors"
    if not path.is_file():
        subprocess.run([sys.executable, __file__, name], check=True, cwd=ROOT)
    return path


def write_random_model(name: str) -> None:
    import torch
    from safetensors.torch import save_file

    from ldm.checkpoints.loader import build_model
    from ldm.checkpoints.presets import find_preset

    path = CACHE / f"{name}-random-fp16.safetensors"
    print(f"writing {path} (random weights, once)", flush=True)
    torch.manual_seed(0)
    model = build_model(find_preset(RANDOM_MODELS[name]).model, device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would make the UNet trivial
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in model.state_dict().items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)


def diffusers_pipeline(model: str | Path, dtype, scheduler: str = "DDIM"):
    """diffusers' StableDiffusionPipeline from ``model`` (an original-layout file) through its
    single-file converters, into models built empty and given the converted tensors in ``dtype`` (as
    its ``from_single_file(torch_dtype=...)`` does), with the same CLIP tokenizer. ``scheduler``:
    "DDIM", or "DPM++ 2M Karras" (DPMSolverMultistepScheduler as A1111's sampler of that name:
    second order, Karras sigmas, a final sigma of 0)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from ldm.checkpoints.detect import detect_file
    from ldm.checkpoints.original_config import original_config
    from ldm.checkpoints.presets import list_presets
    from ldm.text.clip_tokenizer import open_clip_vocab_folder

    preset = detect_file(Path(model), list_presets()).preset
    checkpoint = load_file(str(model))
    config = original_config(preset.model)

    def built(model_class, model_config, state):  # no float32 copy first
        with torch.device("meta"):
            module = model_class(**model_config)
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    unet = built(UNet2DConditionModel, unet_config, sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config))
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=preset.model.scale_factor)
    vae = built(AutoencoderKL, vae_config, sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config))
    text = text_encoder(preset, checkpoint, sfu).to(dtype).requires_grad_(False)
    del checkpoint
    s = preset.model.schedule
    common = dict(beta_start=s.linear_start, beta_end=s.linear_end, beta_schedule="scaled_linear", steps_offset=1,
                  prediction_type="v_prediction" if preset.model.parameterization == "v" else "epsilon")
    if scheduler == "DDIM":
        chosen = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    elif scheduler == "DPM++ 2M Karras":
        chosen = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                             final_sigmas_type="zero")
    else:
        raise ValueError(f"scheduler must be DDIM or DPM++ 2M Karras, got {scheduler!r}")
    tokenizer = CLIPTokenizer.from_pretrained(open_clip_vocab_folder(), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=chosen,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoder(preset, checkpoint, sfu):
    """diffusers' CLIP text model of an SD v1 file (transformers' CLIPTextModel) or of an SD 2 file
    (OpenCLIP's layers converted to it, the penultimate layer's output as SD 2 reads it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = preset.model.cond_stage
    if any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        config = CLIPTextConfig(vocab_size=clip.vocab_size, hidden_size=clip.width, intermediate_size=clip.width * clip.mlp_ratio,
                                num_hidden_layers=clip.blocks_run, num_attention_heads=clip.heads,
                                max_position_embeddings=clip.context_length, hidden_act="gelu", projection_dim=clip.embed_dim)
        text = CLIPTextModel(config)
        converted = sfu.convert_open_clip_checkpoint(text, checkpoint)
        text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()
                              if not k.endswith("position_ids")}, strict=False)
        return text.eval()
    config = CLIPTextConfig(vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
                            num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads,
                            max_position_embeddings=clip.max_positions, hidden_act=clip.hidden_act)
    text = CLIPTextModel(config)
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")},
                         strict=True)
    return text.eval()


if __name__ == "__main__":
    write_random_model(sys.argv[1])
