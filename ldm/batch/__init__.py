"""Batches of text-to-image jobs (``python -m ldm batch``): a prompts file or a grid expanded into jobs
named by a hash of their parameters (``jobs``), rendered by a ``Renderer`` that loads each model once
(``render``), written atomically with a JSON sidecar each so that a rerun renders only what is missing
(``outputs``), in this process (``run``) or fanned out over Ray (``ldm.distributed.batch``).

Nothing here imports Ray.
"""
