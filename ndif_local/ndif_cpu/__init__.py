"""Adapters that let ndif 0.1.2 (the NDIF server) run on a CPU-only machine, through ndif's own settings.

Server-side only: imported by the NDIF processes that ``ndif_local/up.sh`` starts (their ``PYTHONPATH`` is
``ndif_local/``, never the repository root, so they cannot import lens_plugins). Nothing here is shipped to
users of lens_plugins.

- ``actor``: the model actor (``NDIF_DEFAULT_MODEL_ACTOR_CLASS``), which loads and runs on CPU.
- ``controller``: the controller actor (``NDIF_CONTROLLER_IMPORT_PATH``), which sizes a model with the
  nnsight we install.
- ``gunicorn_conf``: the API's gunicorn config, bound to loopback.
"""
