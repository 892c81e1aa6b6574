"""AUTOMATIC1111's prompt syntax, parsed: emphasis, ``BREAK``, prompt editing and alternation.

Pure text in, text and weights out; no model and no torch here.

Emphasis (``parse_emphasis``, A1111's ``parse_prompt_attention``)::

    (x)       x at 1.1              [x]     x at 1 / 1.1
    (x:1.3)   x at 1.3              ((x))   x at 1.21 (nesting multiplies)
    \\( \\) \\[ \\] \\\\   the literal character
    BREAK     ends the current 75-token chunk (a ``Piece`` with ``is_break``)

An unclosed bracket applies its factor from where it opens to the end; a closing bracket with no
opening one is literal text. Neighbouring pieces of equal weight are merged. Two choices differ from
A1111, which would otherwise fail or lose text: a ``BREAK`` inside brackets still breaks, and a lone
backslash stays a literal backslash. Every weight must lie within ``WEIGHT_RANGE``; ``(x:1e9)`` or
nesting beyond it raises ``PromptWeightError`` (a ``ValueError``) naming the range.

Prompt editing and alternation (``prompt_schedule``, A1111's ``get_learned_conditioning_prompt_schedules``)::

    [from:to:when]   from until step ``when``, then to
    [to:when]        nothing, then to          [from::when]   from, then nothing
    [a|b|c]          a at step 1, b at step 2, c at step 3, a at step 4, ...

``when`` with a decimal point is a fraction of the steps (``0.25``), without one a step number
(``10``), as A1111 1.7+ reads it; the step it names is clamped to the number of steps. A bracket that
does not form one of these stays literal text (it may still be emphasis: ``[a:b]`` is "a:b" at 1/1.1);
a ``|`` outside any bracket makes the whole prompt literal, as A1111's grammar fails on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

WEIGHT_RANGE = (-10.0, 10.0)  # the allowed emphasis weight of any text, explicit or from nesting
ROUND, SQUARE = 1.1, 1 / 1.1
# How an encoder applies the weights (``ldm.models.clip.apply_emphasis``): "Original" multiplies and
# restores each chunk's mean, "No norm" only multiplies.
EMPHASIS_MODES = ("Original", "No norm")


def check_emphasis(mode: str) -> str:
    if mode not in EMPHASIS_MODES:
        raise ValueError(f"emphasis {mode!r} is not known; use one of {', '.join(EMPHASIS_MODES)}")
    return mode


class PromptWeightError(ValueError):
    """An emphasis weight outside ``WEIGHT_RANGE``."""


class Piece(NamedTuple):
    text: str
    weight: float
    is_break: bool = False


BREAK = Piece("BREAK", 1.0, is_break=True)

# One token of the emphasis grammar; group 1 is an explicit weight ":1.3)" closing a round bracket.
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_EMPHASIS_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|\\"  # a lone backslash
    r"|\("
    r"|\["
    rf"|:\s*({_NUMBER})\s*\)"
    r"|\)"
    r"|]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _check_weight(weight: float, what: str, prompt: str) -> None:
    low, high = WEIGHT_RANGE
    if not low <= weight <= high:  # also refuses nan
        raise PromptWeightError(f"prompt weight {weight:g} ({what}) in {prompt[:80]!r} is outside the allowed "
                                f"range {low:g} to {high:g}")


def _merged(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and not last.is_break and not piece.is_break and last.weight == piece.weight:
            merged[-1] = Piece(last.text + piece.text, last.weight)
        else:
            merged.append(piece)
    return merged


def parse_emphasis(prompt: str) -> list[Piece]:
    """The prompt as pieces of text with their weights, ``BREAK`` markers in between. An empty
    prompt is ``[Piece("", 1.0)]``. Raises ``PromptWeightError`` for a weight outside ``WEIGHT_RANGE``."""
    texts: list[str] = []
    weights: list[float] = []
    breaks: list[bool] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    def add(text: str, is_break: bool = False) -> None:
        texts.append(text)
        weights.append(1.0)
        breaks.append(is_break)

    for match in _EMPHASIS_TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            add(token[1])
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            explicit = float(weight)
            _check_weight(explicit, f"written {weight!r}", prompt)
            multiply_from(round_open.pop(), explicit)
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    add("BREAK", is_break=True)
                add(part)
    for start in round_open:
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)

    pieces = [Piece(t, 1.0, True) if b else Piece(t, w) for t, w, b in zip(texts, weights, breaks)]
    pieces = [p for p in pieces if p.text or p.is_break]
    for piece in pieces:
        if not piece.is_break:
            _check_weight(piece.weight, f"of {piece.text[:40]!r}, after nesting", prompt)
    return _merged(pieces) or [Piece("", 1.0)]


def strip_syntax(prompt: str) -> str:
    """The prompt's text with the emphasis syntax removed (weights and ``BREAK`` dropped), for
    encoders that read no weights."""
    return " ".join("".join(p.text for p in part) for part in _split_at_breaks(parse_emphasis(prompt)))


def _split_at_breaks(pieces: list[Piece]) -> list[list[Piece]]:
    parts: list[list[Piece]] = [[]]
    for piece in pieces:
        if piece.is_break:
            parts.append([])
        else:
            parts[-1].append(piece)
    return parts


def has_emphasis(pieces: list[Piece]) -> bool:
    """Whether parsed pieces carry any weight other than 1 or any ``BREAK``."""
    return any(p.is_break or p.weight != 1.0 for p in pieces)


# ------------------------------------------------------------------ prompt editing and alternation


@dataclass(frozen=True)
class _Scheduled:
    before: list  # nodes
    after: list
    when: str  # the number as written


@dataclass(frozen=True)
class _Alternate:
    options: list  # of node lists


class _NoMatch(Exception):
    """A bracket that forms no construct of the grammar (it is then literal text)."""


_WHEN = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.DOTALL)


class _Parser:
    """Recursive descent over A1111's editing grammar. Nodes are strings (kept as written, emphasis
    brackets and escapes included, for ``parse_emphasis`` to read later), ``_Scheduled`` and ``_Alternate``."""

    def __init__(self, text: str):
        self.text = text

    def top(self) -> list | None:
        """The whole prompt's nodes, or None where A1111's grammar fails (a ``|`` outside brackets).
        A bracket that forms no construct is a literal character, and parsing goes on after it."""
        nodes, pos = [], 0
        while pos < len(self.text):
            char = self.text[pos]
            plain = _PLAIN.match(self.text, pos)
            if char in "[(":
                try:
                    found, pos = self.square(pos) if char == "[" else self.round(pos)
                    nodes += found
                    continue
                except _NoMatch:
                    pass
            elif plain is not None:
                nodes.append(plain.group(0))
                pos = plain.end()
                continue
            elif char == "|":
                return None
            nodes.append(char)  # a stray bracket, colon or lone backslash: literal text
            pos += 1
        return nodes

    def sequence(self, pos: int, stops: str) -> tuple[list, int]:
        """Nodes from ``pos`` up to a character of ``stops`` (or one the grammar cannot take here)."""
        nodes = []
        while pos < len(self.text):
            char = self.text[pos]
            if char in stops:
                break
            if char == "[":
                node, pos = self.square(pos)
                nodes += node
            elif char == "(":
                node, pos = self.round(pos)
                nodes += node
            else:
                plain = _PLAIN.match(self.text, pos)
                if plain is None:
                    break
                nodes.append(plain.group(0))
                pos = plain.end()
        return nodes, pos

    def expect(self, pos: int, char: str) -> int:
        if pos >= len(self.text) or self.text[pos] != char:
            raise _NoMatch
        return pos + 1

    def round(self, pos: int) -> tuple[list, int]:
        """``(prompt)`` or ``(prompt:prompt)``, kept as text around its nodes."""
        first, pos = self.sequence(pos + 1, ":)|]")
        if pos < len(self.text) and self.text[pos] == ":":
            second, pos = self.sequence(pos + 1, ":)|]")
            return ["(", *first, ":", *second, ")"], self.expect(pos, ")")
        return ["(", *first, ")"], self.expect(pos, ")")

    def square(self, pos: int) -> tuple[list, int]:
        """``[prompt]`` (emphasis, kept as text), ``[a|b]``, ``[to:when]`` or ``[from:to:when]``."""
        first, pos = self.sequence(pos + 1, ":|])")
        char = self.text[pos] if pos < len(self.text) else ""
        if char == "]":
            return ["[", *first, "]"], pos + 1
        if char == "|":
            options = [first]
            while pos < len(self.text) and self.text[pos] == "|":
                option, pos = self.sequence(pos + 1, ":|])")
                options.append(option)
            return [_Alternate(options)], self.expect(pos, "]")
        if char != ":":
            raise _NoMatch
        when = _WHEN.match(self.text, pos + 1)
        if when:
            return [_Scheduled([], first, when.group(1))], when.end()
        second, pos = self.sequence(pos + 1, ":|])")
        pos = self.expect(pos, ":")
        when = _WHEN.match(self.text, pos)
        if not when:
            raise _NoMatch
        return [_Scheduled(first, second, when.group(1))], when.end()


def _when_step(when: str, steps: int) -> int:
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _boundaries(nodes: list, steps: int) -> set[int]:
    found = set()
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = _when_step(node.when, steps)
            if step >= 1:
                found.add(step)
            found |= _boundaries(node.before, steps) | _boundaries(node.after, steps)
        elif isinstance(node, _Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _boundaries(option, steps)
    return found


def _text_at(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            out.append(_text_at(node.before if step <= _when_step(node.when, steps) else node.after, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node)
    return "".join(out)


class ScheduledPrompt(NamedTuple):
    until_step: int  # the last step (1-based) this text is used for
    text: str  # still carrying its emphasis syntax


def prompt_schedule(prompt: str, steps: int) -> list[ScheduledPrompt]:
    """The prompt's texts over ``steps`` sampling steps: ``text`` is used for the steps after the
    previous entry's ``until_step`` up to its own (1-based); the last entry ends at ``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 to schedule a prompt, got {steps}")
    nodes = _Parser(prompt).top()
    if nodes is None:
        return [ScheduledPrompt(steps, prompt)]
    ends = sorted(_boundaries(nodes, steps) | {steps})
    return [ScheduledPrompt(end, _text_at(nodes, end, steps)) for end in ends]


def text_at_step(schedule: list[ScheduledPrompt], step: int) -> str:
    """The text of a schedule at ``step`` (1-based); past the end, the last one."""
    for entry in schedule:
        if step <= entry.until_step:
            return entry.text
    return schedule[-1].text
