"""Errors reach the user as one short sentence (``gr.Error``), never as a stack trace; the log keeps
the details of anything unexpected."""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from ui.outputs import OutputError

log = logging.getLogger(__name__)

MAX_MESSAGE = 300


def message_for(error: BaseException) -> str:
    if isinstance(error, (ValueError, FileNotFoundError, OutputError)):
        text = str(error)  # our own messages: they name the parameter and what is allowed, or the folder
    elif isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        text = "not enough memory for this size; try a smaller image, a smaller batch or tiling"
    else:
        text = f"generation failed ({type(error).__name__}); the studio's log has the details"
    text = text[:1].upper() + text[1:]
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def friendly(fn):
    """Wrap a handler (plain or generator) so that its errors become ``gr.Error`` messages."""

    def report(error: BaseException) -> gr.Error:
        if not isinstance(error, (ValueError, FileNotFoundError, OutputError)):
            log.error("handler %s failed", fn.__name__, exc_info=error)
        return gr.Error(message_for(error), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:  # noqa: BLE001 - every failure becomes a message
                raise report(error) from None

        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001
            raise report(error) from None

    return plain
