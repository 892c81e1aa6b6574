"""The studio in a real browser: Playwright drives Debian's Chromium against the app served on a free
port with the embedded default model. Each tab: set the controls, generate, wait for the result and
check the actual image; the mask stroke and the dragged box are checked as the server received them
(the mask file and the boxes saved with the result). Screenshots of every tab go to the test's
folder, or to docs/screenshots/ with LDM_STUDIO_SCREENSHOTS=1 (the README shows those)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from ldm.data.world import COLOURS, render, scene_from_seed
from ldm.tasks.parameters import parse_parameters
from tests.helpers import free_port

pytestmark = pytest.mark.browser

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (requirements-dev.txt)")
expect = playwright.expect

CHROMIUM = os.environ.get("LDM_STUDIO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
TIMEOUT = 120_000  # ms for a generation on a busy 2-core machine




@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    studio = app.make_studio(app.parse_args(["--outputs", str(outputs), "--device", "cpu"]))
    port = free_port()
    server = app.launch(studio, "127.0.0.1", port, block=False)
    studio.url = f"http://127.0.0.1:{port}/"
    yield studio
    server.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./launch.sh test installs Debian's chromium package")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, studio):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(30_000)
    page.goto(studio.url)
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    page.wait_for_function("window.ldmStudioShortcuts === true")
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    if os.environ.get("LDM_STUDIO_SCREENSHOTS"):
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    return tmp_path_factory.mktemp("screenshots")


# --- helpers -------------------------------------------------------------------------------------------


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a dropdown by its exact label."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(option)


def edit_cell(page, table, row: int, col: int, text: str) -> None:
    """Type into a cell of a Dataframe: double-click opens its editor (waited for, then filled, so
    the old value is replaced whatever the timing), Enter commits."""
    cell = table.locator(f"[data-row='{row}'][data-col='{col}']")
    cell.dblclick()
    editor = cell.locator("input, textarea").first
    editor.wait_for(state="visible", timeout=TIMEOUT)
    editor.fill(text)
    editor.press("Enter")
    expect(table.locator(f"[data-row='{row}'][data-col='{col}']")).to_contain_text(text, timeout=TIMEOUT)


def wait_for_result(page, tab: str, count: int = 1) -> Image.Image:
    """The newest image of the tab's gallery, fetched from the page as the browser shows it."""
    try:
        page.wait_for_function(f"document.querySelectorAll('#{tab}-gallery img').length >= {count}", timeout=TIMEOUT)
    except Exception:
        page.screenshot(path="/tmp/pw/fail.png", full_page=True)
        raise
    page.wait_for_function(f"(document.querySelector('#{tab}-status')?.innerText || '').includes('saved')", timeout=TIMEOUT)
    src = page.locator(f"#{tab}-gallery img").first.get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def saved_outputs(studio) -> list[Path]:
    folder = studio.writer.folder()
    return sorted(p for p in folder.glob("*.png") if re.fullmatch(r"\d{5}-\d+\.png", p.name))


def studio_record(path: Path) -> dict:
    with Image.open(path) as image:
        return {"parameters": image.text["parameters"], **json.loads(image.text["ldm_studio"])}


def colour_share(image: Image.Image, colour: str, tolerance: float = 80.0) -> float:
    """Fraction of pixels within ``tolerance`` (RGB distance) of one of the world's colours."""
    pixels = np.asarray(image, dtype=np.float32)
    return float((np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < tolerance).mean())


def not_blank(image: Image.Image) -> bool:
    return float(np.asarray(image, dtype=np.float32).std()) > 4.0


def upload(page, elem_id: str, path: Path) -> None:
    """Give a file to an image component and wait until it shows it (tried again if the component
    was not ready for it)."""
    page.locator(f"#{elem_id} input[type=file]").first.wait_for(state="attached")
    page.wait_for_timeout(1000)  # a tab's components attach their listeners just after they mount
    for _ in range(3):
        page.locator(f"#{elem_id} input[type=file]").first.set_input_files(str(path))
        try:
            if elem_id in ("inpaint-editor", "img2img-editor"):
                page.locator(f"#{elem_id}").get_by_text("Upload an image").wait_for(state="hidden", timeout=10_000)
            else:
                page.locator(f"#{elem_id} img").first.wait_for(timeout=10_000)
            page.wait_for_timeout(300)
            return
        except playwright.TimeoutError:
            continue
    page.screenshot(path="/tmp/pw/upload-fail.png", full_page=True)
    raise AssertionError(f"{elem_id} never showed the uploaded {path.name}")


def drag(page, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()


def open_layout_canvas(page) -> tuple[float, float, float]:
    """Open the layout tab; the (left, top, side) on screen of its square canvas image, which is drawn
    as large as fits, centred in the canvas element."""
    page.get_by_role("tab", name="Layout").click()
    canvas = page.locator("#layout-canvas canvas").first
    canvas.wait_for()
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    side = min(box["width"], box["height"])
    return box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2, side


# --- the tabs ------------------------------------------------------------------------------------------


def test_text_to_image_shows_and_saves_the_prompted_image(page, studio, shots):
    before = len(saved_outputs(studio))
    page.locator("#txt2img-prompt textarea").fill("a large red circle in the center")
    set_number(page, "txt2img-steps", 20)
    set_number(page, "txt2img-scale", 4)
    page.locator("#txt2img-seed input").fill("5")
    page.locator("#txt2img-generate").click()
    shown = wait_for_result(page, "txt2img")
    assert page.locator("#txt2img-preview img").count() == 1  # the live preview showed the steps
    saved = saved_outputs(studio)
    assert len(saved) == before + 1
    with Image.open(saved[-1]) as on_disk:
        assert shown.size == on_disk.size == (64, 64)
        assert np.array_equal(np.asarray(shown), np.asarray(on_disk.convert("RGB")))
    assert not_blank(shown)
    assert colour_share(shown, "red") > 0.02, "the prompt's colour is not in the image"
    record = studio_record(saved[-1])
    assert record["task"] == "txt2img" and "Seed: 5" in record["parameters"] and "CFG scale: 4.0" in record["parameters"]
    assert "a large red circle in the center" in page.locator("#txt2img-parameters textarea").input_value()
    # the first result is shown whole, inside the gallery's height, not as one width-filling tile cut off
    top, bottom = page.evaluate("""() => { const g = document.querySelector('#txt2img-gallery').getBoundingClientRect();
        const i = document.querySelector('#txt2img-gallery img').getBoundingClientRect();
        return [i.top - g.top, g.bottom - i.bottom]; }""")
    assert top >= 0 and bottom >= 0, (top, bottom)
    page.screenshot(path=str(shots / "txt2img.png"), full_page=True)


def test_ctrl_enter_generates_and_the_seed_can_be_reused(page, studio):
    page.locator("#txt2img-prompt textarea").fill("a small blue square on the left")
    set_number(page, "txt2img-steps", 5)
    page.locator("#txt2img-seed input").fill("-1")
    page.locator("#txt2img-prompt textarea").press("Control+Enter")
    wait_for_result(page, "txt2img")
    seed = re.search(r"Seed: (\d+)", studio_record(saved_outputs(studio)[-1])["parameters"]).group(1)
    page.locator("#txt2img-reuse-seed").click()
    page.wait_for_function(f"document.querySelector('#txt2img-seed input')?.value === '{seed}'")


def test_stop_keeps_finished_batches(page, studio):
    before = len(saved_outputs(studio))
    page.locator("#txt2img-prompt textarea").fill("a green triangle")
    set_number(page, "txt2img-steps", 150)
    set_number(page, "txt2img-batch-count", 16)
    page.locator("#txt2img-seed input").fill("5")
    page.locator("#txt2img-generate").click()
    page.wait_for_function("(document.querySelector('#txt2img-status')?.innerText || '').includes('batch 2 of 16')", timeout=TIMEOUT)
    page.locator("#txt2img-stop").click()
    page.wait_for_function("(document.querySelector('#txt2img-status')?.innerText || '').includes('Stopped after')", timeout=TIMEOUT)
    assert len(saved_outputs(studio)) == before + 1  # the first batch finished and stays
    assert page.locator("#txt2img-gallery img").count() >= 1


def test_a_studio_png_restores_its_settings(page, studio):
    page.locator("#txt2img-prompt textarea").fill("a yellow star at the top")
    set_number(page, "txt2img-steps", 4)
    page.locator("#txt2img-seed input").fill("321")
    page.locator("#txt2img-generate").click()
    wait_for_result(page, "txt2img")
    made = saved_outputs(studio)[-1]
    page.reload()
    page.wait_for_selector("#txt2img-generate")
    page.locator("#txt2img-restore input[type=file]").set_input_files(str(made))
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea')?.value === 'a yellow star at the top'")
    assert page.locator("#txt2img-seed input").input_value() == "321"
    assert page.locator("#txt2img-steps input[type=number]").input_value() == "4"


def test_the_sampler_menus_set_eta_reach_the_image_and_are_restored(page, studio):
    eta = page.locator("#txt2img-eta input[type=number]")
    choose(page, "txt2img-sampler", "Euler a")
    expect(eta).to_have_value("1")  # the ancestral samplers' default eta
    expect(eta).to_be_enabled()
    choose(page, "txt2img-sampler", "DPM++ 2M")
    expect(eta).to_be_disabled()  # DPM++ 2M takes no eta
    choose(page, "txt2img-sampler", "Euler a")
    choose(page, "txt2img-schedule", "Karras")
    page.locator("#txt2img-prompt textarea").fill("a blue square")
    set_number(page, "txt2img-steps", 4)
    page.locator("#txt2img-seed input").fill("8")
    page.locator("#txt2img-generate").click()
    wait_for_result(page, "txt2img")
    text = page.locator("#txt2img-parameters textarea").input_value()
    assert "Sampler: Euler a, Schedule type: Karras," in text and "Eta: 1.0" in text
    made = saved_outputs(studio)[-1]
    page.reload()
    page.wait_for_selector("#txt2img-generate")
    expect(page.locator("#txt2img-sampler input")).to_have_value("DDIM")
    page.locator("#txt2img-restore input[type=file]").set_input_files(str(made))
    expect(page.locator("#txt2img-sampler input")).to_have_value("Euler a", timeout=TIMEOUT)
    expect(page.locator("#txt2img-schedule input")).to_have_value("Karras")
    expect(eta).to_be_enabled()


def test_inpainting_fills_the_painted_stroke_and_keeps_the_rest(page, studio, shots, tmp_path):
    source = tmp_path / "scene.png"
    render(scene_from_seed(3), 64).save(source)
    page.get_by_role("tab", name="Inpainting").click()
    upload(page, "inpaint-editor", source)
    canvas = page.locator("#inpaint-editor canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    side = min(box["width"], box["height"])  # the 64 px image is drawn centred, as large as fits
    drag(page, (cx - side * 0.2, cy), (cx + side * 0.2, cy), steps=12)
    page.locator("#inpaint-prompt textarea").fill("a green square in the center")
    set_number(page, "inpaint-steps", 20)
    page.locator("#inpaint-seed input").fill("2")
    page.locator("#inpaint-generate").click()
    shown = wait_for_result(page, "inpaint")
    result = saved_outputs(studio)[-1]
    record = studio_record(result)
    assert record["task"] == "inpaint" and record["mask"]["feather"] == 0
    mask = np.asarray(Image.open(result.parent / record["files"]["mask"])) > 0
    assert mask.shape == (64, 64)
    assert mask[32, 24:40].all(), "the stroke across the centre is not in the mask the server received"
    assert not mask[:8].any() and not mask[-8:].any(), "the mask reaches beyond the stroke"
    original = np.asarray(Image.open(source).convert("RGB"))
    out = np.asarray(shown)
    assert out.shape == original.shape
    assert np.array_equal(out[~mask], original[~mask]), "unmasked pixels changed"
    assert not np.array_equal(out[mask], original[mask])
    page.screenshot(path=str(shots / "inpaint.png"), full_page=True)


def test_inpainting_without_a_mask_says_what_to_do(page, tmp_path):
    source = tmp_path / "scene.png"
    render(scene_from_seed(4), 64).save(source)
    # a fresh page: over the last test's picture, the editor shows the new one before its value is
    # sent, and a click in between would send no picture at all
    page.reload()
    page.wait_for_selector("#txt2img-generate")
    page.get_by_role("tab", name="Inpainting").click()
    upload(page, "inpaint-editor", source)
    # the editor draws the picture on its canvas a moment after showing it; a click before then sends
    # nothing (the outputs turn to "Error" with no message), as a painted stroke's test never meets
    page.locator("#inpaint-editor canvas").first.wait_for()
    page.wait_for_timeout(2000)
    page.locator("#inpaint-generate").click()
    message = page.get_by_text("The mask is empty")
    message.first.wait_for(timeout=TIMEOUT)
    assert "Traceback" not in page.content()


def test_image_to_image_blends_a_sketched_stroke_and_saves_its_strength(page, studio, shots, tmp_path):
    source = tmp_path / "scene.png"
    render(scene_from_seed(5), 64).save(source)
    page.get_by_role("tab", name="Image to image").click()
    upload(page, "img2img-editor", source)
    page.locator("#img2img-sketch input").check()
    canvas = page.locator("#img2img-editor canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    side = min(box["width"], box["height"])  # the 64 px picture is drawn centred, as large as fits
    drag(page, (cx - side * 0.2, cy), (cx + side * 0.2, cy), steps=12)
    page.locator("#img2img-prompt textarea").fill("a red circle")
    set_number(page, "img2img-strength", 0.5)
    set_number(page, "img2img-steps", 8)
    page.locator("#img2img-seed input").fill("3")
    page.locator("#img2img-generate").click()
    shown = wait_for_result(page, "img2img")
    result = saved_outputs(studio)[-1]
    record = studio_record(result)
    assert record["task"] == "img2img" and record["img2img"]["sketch"] is True
    with Image.open(result) as on_disk:
        assert shown.size == on_disk.size == (64, 64)
    fields = parse_parameters(record["parameters"])
    assert (fields["Denoising strength"], fields["Steps"], fields["Seed"]) == ("0.5", "8", "3")
    strokes = np.asarray(Image.open(result.parent / record["files"]["sketch"]))
    assert strokes.shape == (64, 64, 4)
    drawn = strokes[..., 3] > 0
    assert drawn[32, 24:40].all(), "the stroke across the centre is not in the sketch the server received"
    assert not drawn[:8].any() and not drawn[-8:].any(), "the sketch reaches beyond the stroke"
    assert tuple(strokes[32, 32, :3]) == (0xd6, 0x28, 0x28)  # the brush's default colour
    original = np.asarray(Image.open(result.parent / record["files"]["input"]))
    assert np.array_equal(original, np.asarray(Image.open(source).convert("RGB")))
    page.screenshot(path=str(shots / "img2img.png"), full_page=True)


def test_outpainting_extends_the_picture_and_keeps_its_middle(page, studio, shots, tmp_path):
    source = tmp_path / "scene.png"
    render(scene_from_seed(5), 64).save(source)
    page.get_by_role("tab", name="Inpainting").click()
    upload(page, "inpaint-editor", source)
    page.locator("#inpaint-mode").get_by_label("Outpaint").check()
    set_number(page, "inpaint-outpaint-left", 64)
    set_number(page, "inpaint-outpaint-right", 64)
    set_number(page, "inpaint-outpaint-mask-blur", 5)
    # the extended canvas is previewed before anything is generated
    expect(page.locator("#inpaint-outpaint-preview")).to_contain_text("192x64", timeout=TIMEOUT)
    page.locator("#inpaint-prompt textarea").fill("a red circle")
    set_number(page, "inpaint-steps", 10)
    page.locator("#inpaint-seed input").fill("3")
    page.locator("#inpaint-generate").click()
    shown = wait_for_result(page, "inpaint")
    original = np.asarray(Image.open(source).convert("RGB"))
    out = np.asarray(shown)
    assert out.shape == (64, 64 + 128, 3), "the result is not 128 px wider"
    assert np.array_equal(out[:, 64:128], original), "the original picture's area changed"
    assert not_blank(Image.fromarray(out[:, :64])) and not_blank(Image.fromarray(out[:, 128:]))
    record = studio_record(saved_outputs(studio)[-1])
    assert record["task"] == "inpaint" and record["outpaint"]["left"] == 64 and record["outpaint"]["right"] == 64
    assert parse_parameters(record["parameters"])["Outpaint"] == "left 64, right 64, top 0, bottom 0"
    page.screenshot(path=str(shots / "outpaint.png"), full_page=True)
    # its PNG restores the mode and the outpaint settings on a fresh page
    page.reload()
    page.wait_for_selector("#txt2img-generate")
    page.get_by_role("tab", name="Inpainting").click()
    page.locator("#inpaint-restore input[type=file]").set_input_files(str(saved_outputs(studio)[-1]))
    expect(page.locator("#inpaint-mode").get_by_label("Outpaint")).to_be_checked(timeout=TIMEOUT)
    expect(page.locator("#inpaint-outpaint-mask-blur input[type=number]")).to_have_value("5")
    expect(page.locator("#inpaint-outpaint-right input[type=number]")).to_have_value("64")


def test_upscaling_multiplies_the_size_by_four_in_tiles(page, studio, shots, tmp_path):
    source = tmp_path / "small.png"
    low = render(scene_from_seed(8), 32)
    low.save(source)
    page.get_by_role("tab", name="Upscaling").click()
    upload(page, "upscale-input", source)
    set_number(page, "upscale-tile", 16)
    set_number(page, "upscale-overlap", 4)
    set_number(page, "upscale-steps", 10)
    page.locator("#upscale-seed input").fill("1")
    page.locator("#upscale-generate").click()
    shown = wait_for_result(page, "upscale")
    assert shown.size == (128, 128)
    assert not_blank(shown)
    back = np.asarray(shown.resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(back - np.asarray(low, dtype=np.float32)).mean() < 25, "the upscale does not follow its input"
    record = studio_record(saved_outputs(studio)[-1])
    assert record["tiles"] == {"tile": 16, "overlap": 4} and "Upscale: 4x" in record["parameters"]
    page.screenshot(path=str(shots / "upscale.png"), full_page=True)


def test_layout_sends_the_dragged_box(page, studio, shots):
    left, top, side = open_layout_canvas(page)
    x0, y0, x1, y1 = 0.1, 0.1, 0.45, 0.45
    drag(page, (left + x0 * side, top + y0 * side), (left + x1 * side, top + y1 * side))
    page.get_by_role("button", name="OK").click()
    page.locator("#layout-prompt textarea, #layout-prompt input").fill("a large red circle in the top left")
    set_number(page, "layout-steps", 20)
    page.locator("#layout-seed input").fill("4")
    page.locator("#layout-generate").click()
    shown = wait_for_result(page, "layout")
    assert shown.size == (64, 64) and not_blank(shown)
    record = studio_record(saved_outputs(studio)[-1])
    assert record["task"] == "layout"
    (received,) = record["boxes"]
    assert received["label"] == "red circle"
    assert np.allclose(received["box"], [x0, y0, x1, y1], atol=0.03), received
    assert "Layout: red circle" in record["parameters"]
    assert colour_share(shown.crop((0, 0, 32, 32)), "red") > colour_share(shown.crop((32, 32, 64, 64)), "red")
    page.screenshot(path=str(shots / "layout.png"), full_page=True)


def test_layout_boxes_as_region_prompts(page, studio):
    left, top, side = open_layout_canvas(page)
    drag(page, (left + 0.55 * side, top + 0.55 * side), (left + 0.95 * side, top + 0.95 * side))
    page.get_by_role("button", name="OK").click()
    page.locator("#layout-boxes-as").get_by_label("region prompts").check()
    table = page.locator("#layout-regions")
    expect(table.locator("[data-row='0'][data-col='0']")).to_contain_text("red circle", timeout=TIMEOUT)
    edit_cell(page, table, 0, 1, "green")
    edit_cell(page, table, 0, 2, "0.8")
    set_number(page, "layout-steps", 10)
    page.locator("#layout-seed input").fill("2")
    page.locator("#layout-generate").click()
    shown = wait_for_result(page, "layout")
    assert shown.size == (64, 64) and not_blank(shown)
    record = studio_record(saved_outputs(studio)[-1])
    fields = parse_parameters(record["parameters"])
    label, *corners, strength = fields["Regions"].rsplit(" ", 5)
    assert label == "red circle" and float(strength) == 0.8
    assert fields["Region negatives"] == "1: green"
    assert record["regions"] == [["red circle", "green", 0.8]]
    assert np.allclose([float(c) for c in corners], [0.55, 0.55, 0.95, 0.95], atol=0.03)
    assert "Layout" not in fields


def test_text_to_image_beyond_the_training_size_in_tiles(page, studio):
    page.locator("#txt2img-prompt textarea").fill("a yellow star on the left and a blue ring on the right")
    set_number(page, "txt2img-steps", 6)
    set_number(page, "txt2img-width", 160)
    page.get_by_text("Large canvas: tiling").first.click()
    page.locator("#txt2img-tiling-mode").get_by_label("always").check()
    page.locator("#txt2img-generate").click()
    shown = wait_for_result(page, "txt2img")
    assert shown.size == (160, 64) and not_blank(shown)
    page.get_by_text("the canvas is sampled in tiles of 64 px").first.wait_for(timeout=TIMEOUT)
    fields = parse_parameters(studio_record(saved_outputs(studio)[-1])["parameters"])
    assert fields["Size"] == "160x64" and fields["Tiling"].startswith("always")


def test_hires_fix_doubles_the_size_and_a_dropped_png_restores_it(page, studio):
    page.locator("#txt2img-prompt textarea").fill("a red circle in the center")
    set_number(page, "txt2img-steps", 4)
    page.locator("#txt2img-seed input").fill("9")
    page.get_by_text("Hires fix").first.click()  # the section is closed until opened
    page.locator("#txt2img-hires-enable input[type=checkbox]").check()
    set_number(page, "txt2img-hires-scale", 2)
    choose(page, "txt2img-hires-upscaler", "Latent (nearest)")
    set_number(page, "txt2img-hires-steps", 3)
    set_number(page, "txt2img-hires-strength", 0.5)
    page.locator("#txt2img-generate").click()
    shown = wait_for_result(page, "txt2img")
    assert shown.size == (128, 128) and not_blank(shown)  # the default model's 64 px, twice
    made = saved_outputs(studio)[-1]
    fields = parse_parameters(studio_record(made)["parameters"])
    assert (fields["Size"], fields["Hires upscale"], fields["Hires steps"]) == ("64x64", "2", "3")
    assert (fields["Hires upscaler"], fields["Denoising strength"]) == ("Latent (nearest)", "0.5")
    page.reload()
    page.wait_for_selector("#txt2img-generate")
    page.locator("#txt2img-restore input[type=file]").set_input_files(str(made))
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea')?.value === 'a red circle in the center'")
    page.get_by_text("Hires fix").first.click()
    expect(page.locator("#txt2img-hires-enable input[type=checkbox]")).to_be_checked()
    expect(page.locator("#txt2img-hires-steps input[type=number]")).to_have_value("3")
    expect(page.locator("#txt2img-hires-upscaler input")).to_have_value("Latent (nearest)")
    expect(page.locator("#txt2img-width input[type=number]")).to_have_value("64")  # the first pass's size


def test_send_to_inpainting_carries_the_image_and_prompt(page, studio):
    page.locator("#txt2img-prompt textarea").fill("a purple ring on the right")
    set_number(page, "txt2img-steps", 4)
    page.locator("#txt2img-generate").click()
    wait_for_result(page, "txt2img")
    page.locator("#txt2img-send-to-inpaint").click()
    page.wait_for_function("document.querySelector('#inpaint-prompt textarea')?.value === 'a purple ring on the right'")
    assert page.get_by_role("tab", name="Inpainting").get_attribute("aria-selected") == "true"
    page.locator("#inpaint-editor canvas").first.wait_for()


def test_a_click_on_an_add_on_puts_its_tag_in_the_prompt(page, studio, tmp_path):
    from tests.builders.lora import random_lora, write

    write(tmp_path / "Lora" / "inkwash.safetensors",
          random_lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 768)}, 4))
    studio.extra_lora_dirs = (tmp_path / "Lora",)
    try:
        page.locator("#txt2img-prompt textarea").fill("a red circle")
        page.locator("#txt2img-addons").get_by_text("Add-ons").first.click()
        page.locator("#txt2img-addons-rescan").click()
        page.locator("#txt2img-addons-search textarea").fill("INKW")  # the only row, whatever models/Lora holds
        table = page.locator("#txt2img-addons-table")
        expect(table.locator("[data-row='0'][data-col='0']")).to_have_text("inkwash", timeout=TIMEOUT)
        table.locator("[data-row='0'][data-col='0']").click()
        page.wait_for_function("document.querySelector('#txt2img-prompt textarea')?.value === 'a red circle <lora:inkwash:1>'")
    finally:
        studio.extra_lora_dirs = ()
        studio.addons(refresh=True)
