"""LDM Studio on Ray, the optional extra (``requirements-ray.txt``; ``./launch.sh --ray ...``).

The engine never imports this package; the CLI imports it only for ``--ray local|ADDRESS``, and it
imports Ray only when used (``cluster.import_ray``), so a missing Ray is a message, not a traceback.
"""
