"""The torch-only core of lens_plugins: what may run on an NDIF server.

Every module here imports nothing but torch and other core modules, carries no decorators and takes
everything as arguments, because nnsight ships these functions by source and rebuilds them on the server
without their module globals. This docstring and ``SHIPPED`` below are the one statement of what ships.
"""

SHIPPED = ("rows", "dola", "patching", "vocab_loss", "future")
