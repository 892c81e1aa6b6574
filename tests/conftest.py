"""The tiny models every test module shares: each family's files written once per session
(``tiny_*``, a ``tests.builders.TinyFiles``), and the ones many tests only read loaded once too
(``loaded_*``: CPU, fp32, the loader's defaults). A test that changes a model (casts it, moves it,
switches a speed path) loads its own copy with ``files.load()``."""

from __future__ import annotations

import pytest

from tests.builders import default, ldm_image, ldm_text, sd2, sd_v1, sdxl, semantic, x4


def _write(tmp_path_factory, name: str, builder, **options):
    return builder.write(tmp_path_factory.mktemp(name), **options)


@pytest.fixture(scope="session")
def tiny_sd_v1(tmp_path_factory):
    return _write(tmp_path_factory, "sd_v1", sd_v1)


@pytest.fixture(scope="session")
def tiny_sd2_v(tmp_path_factory):
    return _write(tmp_path_factory, "sd2_v", sd2, parameterization="v")


@pytest.fixture(scope="session")
def tiny_sd2_inpainting(tmp_path_factory):
    return _write(tmp_path_factory, "sd2_inpainting", sd2, parameterization="eps", inpainting=True)


@pytest.fixture(scope="session")
def tiny_x4(tmp_path_factory):
    return _write(tmp_path_factory, "x4", x4)


@pytest.fixture(scope="session")
def tiny_default_hybrid(tmp_path_factory):
    return _write(tmp_path_factory, "default_hybrid", default, kind="hybrid")


@pytest.fixture(scope="session")
def tiny_default_upscale(tmp_path_factory):
    return _write(tmp_path_factory, "default_upscale", default, kind="upscale")


@pytest.fixture(scope="session")
def tiny_ldm_kl_text(tmp_path_factory):
    return _write(tmp_path_factory, "ldm_kl", ldm_text, kind="kl")


@pytest.fixture(scope="session")
def tiny_ldm_vq_text(tmp_path_factory):
    return _write(tmp_path_factory, "ldm_vq", ldm_text, kind="vq")


@pytest.fixture(scope="session")
def tiny_ldm_layout(tmp_path_factory):
    return _write(tmp_path_factory, "ldm_layout", ldm_text, kind="layout")


@pytest.fixture(scope="session")
def tiny_ldm_inpainting(tmp_path_factory):
    return _write(tmp_path_factory, "ldm_inpainting", ldm_image, kind="inpainting")


@pytest.fixture(scope="session")
def tiny_ldm_sr(tmp_path_factory):
    return _write(tmp_path_factory, "ldm_sr", ldm_image, kind="sr")


@pytest.fixture(scope="session")
def tiny_semantic(tmp_path_factory):
    return _write(tmp_path_factory, "semantic", semantic)


# --- loaded once, for tests that only read the model -----------------------------------------------


@pytest.fixture(scope="session")
def loaded_sd_v1(tiny_sd_v1):
    return tiny_sd_v1.load()


@pytest.fixture(scope="session")
def loaded_sd2_inpainting(tiny_sd2_inpainting):
    return tiny_sd2_inpainting.load()


@pytest.fixture(scope="session")
def loaded_x4(tiny_x4):
    return tiny_x4.load()


@pytest.fixture(scope="session")
def loaded_default_hybrid(tiny_default_hybrid):
    return tiny_default_hybrid.load()


@pytest.fixture(scope="session")
def loaded_default_upscale(tiny_default_upscale):
    return tiny_default_upscale.load()


@pytest.fixture(scope="session")
def loaded_sd2_v(tiny_sd2_v):
    return tiny_sd2_v.load()


@pytest.fixture(scope="session")
def loaded_semantic(tiny_semantic):
    return tiny_semantic.load()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return _write(tmp_path_factory, "sdxl", sdxl)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory):
    return _write(tmp_path_factory, "sdxl_refiner", sdxl, kind="refiner")


@pytest.fixture(scope="session")
def loaded_sdxl(tiny_sdxl):
    return tiny_sdxl.load()


@pytest.fixture(scope="session")
def loaded_sdxl_refiner(tiny_sdxl_refiner):
    return tiny_sdxl_refiner.load()


# --- the studio, for tests of its tabs' handlers ------------------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio on the CPU in fp32 with its own outputs folder, one per test module (a module that needs
    other options defines its own ``studio``)."""
    import app

    return app.make_studio(app.parse_args(["--outputs", str(tmp_path_factory.mktemp("outputs")), "--device", "cpu",
                                           "--dtype", "fp32"]))


# --- a batch (python -m ldm batch), for the in-process and the Ray batch tests ---------------------------


@pytest.fixture(scope="session")
def batch_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\n\n# not a prompt\na blue square\n")
    return path


@pytest.fixture(scope="session")
def batch_in_process(batch_prompts, tmp_path_factory):
    """The folder of 2 prompts x 3 seeds rendered in this process (--ray none)."""
    from ldm.cli import main
    from tests.helpers import batch_args

    out = tmp_path_factory.mktemp("batch")
    assert main(batch_args(batch_prompts, out)) == 0
    return out
