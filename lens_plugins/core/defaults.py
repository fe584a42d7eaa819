"""The defaults every verb shares, in one place: both backends, the CLI and the figures read them here."""

TOP_K = 5  # the lens's top-k tokens per cell
VOCAB_CHUNK = None  # tile sizes: None picks them for the device W_U lives on (readout.tile_sizes)
TOKEN_CHUNK = None
TOP_NEURONS = 20  # the MLP neurons by="neuron" attribution keeps (largest summed magnitude over the batch)

# The most bytes of lens tensors (an affine lens's per-row matrices) a remote request carries; past it, the rows
# are downloaded and decoded on the client (models.checkpoint.decode_rows). SmolLM2's 30 rows: 40 MB; a 70B
# model's 80 rows of 8192^2 float32: 21 GB.
SHIP_LIMIT_BYTES = 1 << 30

__all__ = ["TOP_K", "VOCAB_CHUNK", "TOKEN_CHUNK", "SHIP_LIMIT_BYTES", "TOP_NEURONS"]
