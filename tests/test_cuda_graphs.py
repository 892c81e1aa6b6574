"""UNet calls replayed as CUDA graphs (ldm.kernels.cuda_graphs): the eager numbers for new inputs of a
recorded shape, a graph per shape (none for a shape seen once), new graphs for new weights, eager
calls where graphs cannot be used, and the same image with graphs on or off.

The graph tests need a CUDA device and are skipped elsewhere (CI has none); run them on a GPU machine
with ``python -m pytest tests/test_cuda_graphs.py``. The CPU tests check that graphs stay off there."""

import numpy as np
import pytest
import torch

from ldm.checkpoints.loader import build_model
from ldm.kernels.cuda_graphs import GraphedForward, graphed, set_cuda_graphs
from ldm.kernels.paths import SpeedPaths
from ldm.options import add_device_arguments
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from tests.builders import randomise, sd_v1

def cuda(test):
    """A test that needs a CUDA device: marked ``cuda``, skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def tiny_unet(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    model = build_model(sd_v1.make_preset(50).model, device="cpu")
    randomise(model, seed)
    return model.unet.to(device, dtype).eval().requires_grad_(False)


def inputs(unet, side: int = 8, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = next(unet.parameters())
    config = unet.config
    return {"x": torch.randn(batch, config.in_channels, side, side, generator=g).to(weight.device, weight.dtype),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(weight.device),
            "context": torch.randn(batch, 3, config.context_dim, generator=g).to(weight.device, weight.dtype)}


def test_graphs_stay_off_on_the_cpu():
    unet = tiny_unet("cpu")
    assert set_cuda_graphs(unet, True) is False
    assert graphed(unet) is None and "forward" not in vars(unet)
    with torch.inference_mode():
        unet(**inputs(unet))  # its own forward runs


def test_calls_that_cannot_replay_run_the_module_s_own_forward_and_the_module_is_held_weakly():
    import gc
    import weakref

    unet = tiny_unet("cpu")
    args = inputs(unet)
    with torch.inference_mode():
        expected = unet(**args)
    forward = GraphedForward(unet)
    unet.forward = forward  # as set_cuda_graphs does on a GPU
    with torch.inference_mode():  # CPU tensors: the module's own forward, arguments as given
        out = unet(args["x"], args["t"], context=args["context"])
    assert torch.equal(out, expected) and not forward.graphs and not forward.seen
    gc.disable()  # no collector: only reference counts can free the module
    try:
        alive = weakref.ref(unet)
        del unet
        assert alive() is None and forward.module is None  # no module -> forward -> module cycle
    finally:
        gc.enable()


def test_the_device_options_turn_graphs_off_by_name():
    import argparse

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    assert parser.parse_args([]).cuda_graphs is True
    assert parser.parse_args(["--no-cuda-graphs"]).cuda_graphs is False


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replays_give_the_eager_numbers_for_new_inputs(dtype):
    unet = tiny_unet("cuda", dtype)
    assert set_cuda_graphs(unet, True)
    forward = graphed(unet)
    with torch.inference_mode():
        for seed in range(4):  # eager, recorded, then two replays, each with new numbers
            args = inputs(unet, seed=seed)
            out = unet(**args)
            expected = forward.eager(**args)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert len(forward.graphs) == (0 if seed == 0 else 1)
    with torch.inference_mode():
        out.zero_()  # a returned output is the caller's own: the next replay leaves it alone
        again = unet(**inputs(unet, seed=9))
    assert out.abs().max() == 0 and again.abs().max() > 0


@cuda
def test_one_graph_per_shape_and_none_for_a_shape_seen_once():
    unet = tiny_unet("cuda")
    set_cuda_graphs(unet, True)
    forward = graphed(unet)
    forward.max_graphs = 2
    with torch.inference_mode():
        unet(**inputs(unet, side=16))  # seen once: no graph
        for side in (8, 8, 12, 12, 8):
            args = inputs(unet, side=side, seed=side)
            torch.testing.assert_close(unet(**args), forward.eager(**args), rtol=0, atol=0)
        assert len(forward.graphs) == 2
        unet(**inputs(unet, side=16))  # the second time: recorded; 12 was used least recently and goes
        sides = sorted(key[0][1][1][-1] for key in forward.graphs)  # ("x", ("tensor", shape, ...))
    assert sides == [8, 16]


@cuda
def test_new_weights_are_recorded_again():
    unet = tiny_unet("cuda")
    set_cuda_graphs(unet, True)
    args = inputs(unet)
    with torch.inference_mode():
        for _ in range(3):
            old = unet(**args)
        new_weights = {k: v.clone() for k, v in tiny_unet("cuda", seed=1).state_dict().items()}
        unet.load_state_dict(new_weights, assign=True)  # new tensors: the recorded graph reads the old ones
        out = unet(**args)
        expected = graphed(unet).eager(**args)
        unet(**args)
        replayed = unet(**args)
    assert not torch.equal(out, old)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(replayed, expected, rtol=0, atol=0)


@cuda
def test_calls_with_gradients_or_under_no_grad_after_inference_mode():
    unet = tiny_unet("cuda")
    set_cuda_graphs(unet, True)
    args = inputs(unet)
    x = args["x"].clone().requires_grad_(True)
    for _ in range(3):
        unet(**{**args, "x": x}).square().mean().backward()  # training-like: eager every time
    assert x.grad is not None and not graphed(unet).graphs
    with torch.inference_mode():
        unet(**args)
        unet(**args)  # recorded
    with torch.no_grad():  # the buffers are ordinary tensors, so a no_grad call may copy into them
        out = unet(**args)
        expected = graphed(unet).eager(**args)  # (with gradients on, attention and GEGLU take other kernels)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@cuda
def test_txt2img_gives_the_same_image_with_graphs_on_or_off(tiny_sd_v1):
    on, off = (tiny_sd_v1.load(device="cuda", speed=SpeedPaths(cuda_graphs=g))
               for g in (True, False))
    assert isinstance(vars(on.model.unet).get("forward"), GraphedForward) and graphed(off.model.unet) is None
    request = GenerationRequest(prompt="a red circle", steps=6, scale=3.0, seed=3, width=32, height=32)
    with_graphs = np.asarray(txt2img(on, request).images[0]).astype(int)
    assert graphed(on.model.unet).graphs  # the guided step was recorded and replayed
    without = np.asarray(txt2img(off, request).images[0]).astype(int)
    assert np.abs(with_graphs - without).max() == 0
