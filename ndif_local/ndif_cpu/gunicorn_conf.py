"""The NDIF API's gunicorn config: ndif's own, bound to loopback, with anyio's asyncio backend imported first.

nnsight adds a ``save`` attribute to ``object``; anyio defines some classes lazily, and once nnsight is
imported, defining them fails, so every request over 1 MiB (a spooled upload) gets HTTP 400. Importing
``anyio._backends._asyncio`` here, in the master before the workers fork and before anything imports nnsight,
defines them first.
"""

import os

import anyio._backends._asyncio  # noqa: F401  (must precede nnsight; see the docstring)
from ndif.services.api.gunicorn_conf import on_starting, post_fork, timeout, worker_class, workers  # noqa: F401

bind = f"127.0.0.1:{os.environ['NDIF_API_PORT']}"
