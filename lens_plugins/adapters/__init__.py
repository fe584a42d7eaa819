"""Backend adapters: each finds the residual stream and the decoder in one library's objects."""
