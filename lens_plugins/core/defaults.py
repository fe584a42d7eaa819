"""The defaults every verb shares, in one place: both backends, the CLI and the figures read them here."""

TOP_K = 5  # the lens's top-k tokens per cell
VOCAB_CHUNK = None  # tile sizes: None picks them for the device W_U lives on (readout.tile_sizes)
TOKEN_CHUNK = None
TOP_NEURONS = 20  # the MLP neurons by="neuron" attribution keeps (largest summed magnitude over the batch)

__all__ = ["TOP_K", "VOCAB_CHUNK", "TOKEN_CHUNK", "TOP_NEURONS"]
