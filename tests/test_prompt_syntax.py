"""AUTOMATIC1111's prompt syntax: the pure parser (emphasis, BREAK, editing, alternation), weighted CLIP
and OpenCLIP encoding against A1111's formula written out here, and prompt editing while sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.sampling.samplers import get_sampler
from ldm.sampling.scheduled import ScheduledConditioning
from ldm.tasks.generate import conditioning_schedule
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.txt2img import txt2img
from ldm.text.prompt_syntax import (
    BREAK,
    Piece,
    PromptWeightError,
    parse_emphasis,
    prompt_schedule,
    strip_syntax,
)


def pairs(text: str) -> list[tuple[str, float]]:
    return [(p.text, round(p.weight, 6)) for p in parse_emphasis(text)]


# --- emphasis ------------------------------------------------------------------------------------


def test_the_a1111_doctest_weights():
    assert pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", round(1 / 1.1, 6))]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\\\ back", [("\\ back", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (red:1.3) car", [("a ", 1.0), ("red", 1.3), (" car", 1.0)]),
    ("((x))", [("x", 1.21)]),
    ("[[x]]", [("x", round(1 / 1.21, 6))]),
    ("(x:-1)", [("x", -1.0)]),
    ("closing) only]", [("closing) only]", 1.0)]),
    ("(x:1.2.3)", [("x:1.2.3", 1.1)]),
    ("[word:1.5]", [("word:1.5", round(1 / 1.1, 6))]),
    ("", [("", 1.0)]),
])
def test_emphasis_cases(text, expected):
    assert pairs(text) == expected


def test_break_is_a_marker_of_its_own_even_inside_brackets():
    assert parse_emphasis("a cat BREAK a dog") == [Piece("a cat", 1.0), BREAK, Piece("a dog", 1.0)]
    assert parse_emphasis("(a BREAK b)") == [Piece("a", 1.1), BREAK, Piece("b", 1.1)]
    assert parse_emphasis("BREAKFAST") == [Piece("BREAKFAST", 1.0)]


@pytest.mark.parametrize("text", ["(x:1e9)", "(x:11)", "(x:-10.5)", "(" * 30 + "x"])
def test_absurd_weights_are_refused_naming_the_range(text):
    with pytest.raises(PromptWeightError, match="allowed range -10 to 10"):
        parse_emphasis(text)
    with pytest.raises(ValueError, match="-10 to 10"):
        resolve_request(GenerationRequest(text, steps=4, width=32, height=32), 8)


def test_strip_syntax_keeps_only_the_words():
    assert strip_syntax("a (red:1.3) [car] BREAK \\(x\\)") == "a red car (x)"


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_string_parses_or_is_refused_for_its_weight_only(text):
    try:
        pieces = parse_emphasis(text)
    except PromptWeightError as error:
        assert "allowed range -10 to 10" in str(error)
        return
    assert pieces and all(-10 <= p.weight <= 10 for p in pieces)
    assert prompt_schedule(text, 7)[-1].until_step == 7


@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:|", blacklist_categories=("Cs",)), max_size=80))
@settings(max_examples=300, deadline=None)
def test_text_without_special_characters_is_itself_at_weight_1(text):
    if "BREAK" in text:
        return
    assert parse_emphasis(text) == [Piece(text, 1.0)]
    assert prompt_schedule(text, 5) == [(5, text)]


@given(st.text(alphabet="ab ()[]:|\\0.5", max_size=40), st.integers(1, 30))
@settings(max_examples=300, deadline=None)
def test_bracket_soup_always_schedules(text, steps):
    schedule = prompt_schedule(text, steps)
    ends = [entry.until_step for entry in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1


# --- prompt editing and alternation ---------------------------------------------------------------


@pytest.mark.parametrize("text, steps, expected", [
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("a [b:c:3] d", 5, [(3, "a b d"), (5, "a c d")]),
    ("a [b::3] d", 5, [(3, "a b d"), (5, "a  d")]),
    ("a [b:c:0.25] d", 8, [(2, "a b d"), (8, "a c d")]),
    ("a [b:c:20] d", 5, [(5, "a b d")]),
    ("a [b:c:0] d", 5, [(5, "a c d")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[a|b|c]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
    ("a [[x:y:2]:z:0.5] q", 6, [(2, "a x q"), (3, "a y q"), (6, "a z q")]),
    ("a (red:[b:c:2]) car", 4, [(2, "a (red:b) car"), (4, "a (red:c) car")]),
    ("(x:1.3) [y] [z:w: 2 ]", 3, [(2, "(x:1.3) [y] z"), (3, "(x:1.3) [y] w")]),
    ("a [b:c] d", 3, [(3, "a [b:c] d")]),  # not a schedule: literal (emphasis "b:c")
    ("x [b:c:d:5]", 3, [(3, "x [b:c:d:5]")]),
    ("[a|b] | c", 2, [(2, "[a|b] | c")]),  # a | outside brackets: the whole prompt is literal
    ("unbalanced [a:b:2", 3, [(3, "unbalanced [a:b:2")]),
    ("(a [b:c:1] <lora:ink:0.8>", 2, [(1, "(a b <lora:ink:0.8>"), (2, "(a c <lora:ink:0.8>")]),
])
def test_schedules(text, steps, expected):
    assert [tuple(entry) for entry in prompt_schedule(text, steps)] == expected


def test_lora_tags_are_left_as_text():
    assert parse_emphasis("a <lora:ink:0.8> cat") == [Piece("a <lora:ink:0.8> cat", 1.0)]


# --- weighted encoding -----------------------------------------------------------------------------


def encoder_of(request, name):
    return request.getfixturevalue(name).model.cond_stage_model


def token_weights(tokenizer, pieces: list[tuple[str, float]]) -> list[float]:
    return [w for text, w in pieces for _ in tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("name", ["loaded_sd_v1", "loaded_sd2_v"])
def test_a_prompt_without_syntax_encodes_bit_for_bit_as_before(request, name):
    encoder = encoder_of(request, name)
    prompts = ["a red cat", " ".join(["blue dog"] * 60)]
    with torch.no_grad():
        assert torch.equal(encoder.encode(prompts), encoder(encoder.token_chunks(prompts)))


@pytest.mark.parametrize("name", ["loaded_sd_v1", "loaded_sd2_v"])
@pytest.mark.parametrize("mode", ["Original", "No norm"])
def test_emphasis_matches_a1111s_formula(request, name, mode):
    encoder = encoder_of(request, name)
    prompt = "a (red:1.5) cat, [blue] ((dog))"
    pieces = [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("blue", 1 / 1.1), (" ", 1.0), ("dog", 1.21)]
    multipliers = torch.ones(1, 77)
    row = token_weights(encoder.tokenizer, pieces)
    multipliers[0, 1 : 1 + len(row)] = torch.tensor(row)
    with torch.no_grad():
        z = encoder(encoder.token_chunks(["a red cat, blue dog"]))  # the same tokens, read literally
        got = encoder.encode([prompt], emphasis=mode)
    expected = z * multipliers[..., None]
    if mode == "Original":
        expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, z)


def test_break_and_the_comma_backtrack_choose_the_chunks(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    tok = encoder.tokenizer
    red, cat, comma = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "cat", ","))
    ids = encoder.weighted_chunks(["red cat BREAK cat"]).ids
    assert ids.shape == (1, 2, 77) and ids[0, 0, 1:3].tolist() == [red, cat] and ids[0, 1, 1] == cat
    # a comma 5 tokens before the end: the text after it moves to the next chunk
    ids = encoder.weighted_chunks([" ".join(["red"] * 70) + ", " + " ".join(["cat"] * 10)]).ids
    assert ids[0, 0, 1:72].tolist() == [red] * 70 + [comma] and ids[0, 0, 72] == tok.eos_token_id
    assert ids[0, 1, 1:11].tolist() == [cat] * 10
    # a comma 65 tokens before the end is too far back: a plain cut at 75
    ids = encoder.weighted_chunks([" ".join(["red"] * 10) + ", " + " ".join(["cat"] * 70)]).ids
    assert ids[0, 0, 1:76].tolist() == [red] * 10 + [comma] + [cat] * 64 and ids[0, 1, 1:7].tolist() == [cat] * 6


def test_a_ten_thousand_character_prompt_encodes_in_many_chunks(loaded_sd_v1):
    prompt = ("a (red:1.2) cat, " * 600)[:10_000]
    with torch.no_grad():
        context = loaded_sd_v1.model.encode_prompts([prompt, ""])
    assert context.shape[1] % 77 == 0 and context.shape[1] // 77 > 20 and torch.isfinite(context).all()


# --- prompt editing while sampling ----------------------------------------------------------------


BASE = GenerationRequest("a red cat", "a blue dog", steps=4, scale=5.0, seed=3, width=32, height=32)


def image(loaded, **fields) -> np.ndarray:
    return np.asarray(txt2img(loaded, GenerationRequest(**{**BASE.__dict__, **fields})).images[0])


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_prompt_editing_switches_the_prompt_during_sampling(loaded_sd_v1, sampler):
    red, green = image(loaded_sd_v1, sampler=sampler), image(loaded_sd_v1, sampler=sampler, prompt="a green cat")
    assert np.array_equal(image(loaded_sd_v1, sampler=sampler, prompt="a [red:green:4] cat"), red)
    assert np.array_equal(image(loaded_sd_v1, sampler=sampler, prompt="a [red:green:0] cat"), green)
    edited = image(loaded_sd_v1, sampler=sampler, prompt="a [red:green:2] cat")
    assert not np.array_equal(edited, red) and not np.array_equal(edited, green)


def test_each_distinct_text_is_encoded_once_and_the_negative_may_be_scheduled(loaded_sd_v1, monkeypatch):
    model = loaded_sd_v1.model
    calls = []
    original = model.encode_prompts
    monkeypatch.setattr(model, "encode_prompts", lambda prompts, **kw: calls.append(list(prompts)) or original(prompts, **kw))
    request = GenerationRequest("[a red|a green] cat", "[ugly::2]", steps=4)
    schedule = conditioning_schedule(model, request, None)
    assert calls == [["ugly", "", "a red cat", "a green cat"]]
    assert [entry.until_step for entry in schedule] == [1, 2, 3, 4]
    with torch.no_grad():
        red, green = original(["a red cat"]), original(["a green cat"])
    contexts = [entry.extra["cond"]["context"] for entry in schedule]
    # encoded in one batch of four, each equals its text encoded alone to float rounding (a batch's
    # matrix products may sum in another order on some CPUs), and red and green stay apart
    assert all(torch.allclose(c, e, rtol=0, atol=1e-5) for c, e in zip(contexts, [red, green, red, green]))
    assert (red - green).abs().max() > 1e-2
    assert torch.equal(contexts[0], contexts[2]) and torch.equal(contexts[1], contexts[3])  # encoded once each, reused
    assert torch.equal(schedule[1].extra["uncond"]["context"], schedule[0].extra["uncond"]["context"])
    assert not torch.equal(schedule[2].extra["uncond"]["context"], schedule[1].extra["uncond"]["context"])


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "Heun", "DPM++ 2M", "UniPC"])
def test_every_call_of_a_step_sees_that_steps_conditioning(sampler):
    seen = []

    def denoiser(x, t, *, tag):
        seen.append(tag)
        return torch.zeros_like(x)

    entries = [(1, {"tag": "a"}), (3, {"tag": "b"}), (4, {"tag": "c"})]
    from ldm.sampling.scheduled import ScheduledExtra
    scheduled = ScheduledConditioning(denoiser, [ScheduledExtra(*e) for e in entries])
    steps = []
    alphas = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64)
    get_sampler(sampler).run(scheduled, torch.zeros(1, 1, 2, 2), alphas, 4, eta=0.0,
                             generator=[torch.Generator().manual_seed(0)],
                             callback=scheduled.callback(lambda info: steps.append(len(seen))))
    per_step = [seen[a:b] for a, b in zip([0, *steps], steps)]
    assert [set(calls) for calls in per_step] == [{"a"}, {"b"}, {"b"}, {"c"}]


def test_a_model_reading_no_emphasis_gets_plain_words_and_a_notice(loaded_default_hybrid):
    request = GenerationRequest("a (red:1.3) circle", steps=2, scale=3.0, seed=5, width=32, height=32)
    weighted = txt2img(loaded_default_hybrid, request)
    plain = txt2img(loaded_default_hybrid, GenerationRequest(**{**request.__dict__, "prompt": "a red circle"}))
    assert np.array_equal(np.asarray(weighted.images[0]), np.asarray(plain.images[0]))
    assert any("reads no emphasis" in n for n in weighted.notices)
    assert not any("reads no emphasis" in n for n in plain.notices)


def test_the_parameters_text_names_an_emphasis_other_than_original(loaded_sd_v1):
    from ldm.tasks.parameters import parse_parameters

    request = GenerationRequest("a (red:1.3) cat", steps=2, scale=3.0, seed=1, width=32, height=32)
    assert "Emphasis" not in parse_parameters(txt2img(loaded_sd_v1, request).parameters[0])
    no_norm = txt2img(loaded_sd_v1, GenerationRequest(**{**request.__dict__, "emphasis": "No norm"}))
    assert parse_parameters(no_norm.parameters[0])["Emphasis"] == "No norm"
    with pytest.raises(ValueError, match="Original, No norm"):
        txt2img(loaded_sd_v1, GenerationRequest(**{**request.__dict__, "emphasis": "Loud"}))
