"""The reductions table: every quantity a lens can compute, and everything that follows from its name.

One entry per reduction, in the order results and menus list them. The readout's reduction names, the
request's, ``LensResult``'s fields (a test holds the dataclass to this table), the heatmap metric names and
their plot styles are all read from here, so adding a reduction is one entry plus its arithmetic.

Each entry: ``by`` says who computes it (``"readout"``: the streamed kernel; ``"column"``: a per-position
token the request scores through the readout's ``targets``; ``"internal"``: the readout's target scoring,
which a request never names directly; ``"pipeline"``: a pass after the readout, asked for by its own
argument, ``auto_tokens=N``, not by name); ``outputs`` are the result fields it fills; ``metrics`` maps each
``[row, batch, pos]`` quantity it yields to ``(colour direction, axis title)`` for a heatmap (``"sequential"``:
dark = high; ``"sequential_r"``: dark = low, for ranks; the map itself is ``plot.style.SEQUENTIAL``); ``default`` says
whether a lens computes it when no ``reductions=`` are given. Plain data (no imports): it ships to NDIF.
"""

TABLE = {
    "top_k": {"by": "readout", "outputs": ("top_ids", "top_logprobs"), "default": True,
              "metrics": {"prob": ("sequential", "P(top-1)"), "logprob": ("sequential", "log P(top-1)")}},
    "entropy": {"by": "readout", "outputs": ("entropy",), "default": True,
                "metrics": {"entropy": ("sequential", "entropy (nats)")}},
    "kl_final_row": {"by": "readout", "outputs": ("kl_final_row",), "default": True,
                     "metrics": {"kl_final_row": ("sequential", "KL(final || row) (nats)")}},
    "kl_row_final": {"by": "readout", "outputs": ("kl_row_final",), "default": True,
                     "metrics": {"kl_row_final": ("sequential", "KL(row || final) (nats)")}},
    "js_final": {"by": "readout", "outputs": ("js_final",), "default": False,
                 "metrics": {"js_final": ("sequential", "JS(final, row) (nats)")}},
    "tv_final": {"by": "readout", "outputs": ("tv_final",), "default": False,
                 "metrics": {"tv_final": ("sequential", "TV(final, row)")}},
    "kl_input_row": {"by": "readout", "outputs": ("kl_input_row",), "default": False,
                     "metrics": {"kl_input_row": ("sequential", "KL(input || row) (nats)")}},
    "kl_next_row": {"by": "readout", "outputs": ("kl_next_row",), "default": False,
                    "metrics": {"kl_next_row": ("sequential", "KL(row || next row) (nats)")}},
    "final_top1": {"by": "readout", "outputs": ("final_top1", "final_top1_logprob", "final_top1_rank"),
                   "default": True,
                   "metrics": {"final_top1_rank": ("sequential_r", "rank of final top-1"),
                               "final_top1_logprob": ("sequential", "log P(final top-1)")}},
    "targets": {"by": "internal", "outputs": ("target_logprobs", "target_ranks"), "default": False, "metrics": {}},
    "auto_tokens": {"by": "pipeline", "outputs": ("auto_ids", "auto_logprobs", "auto_reasons", "auto_peak_rows",
                                                  "auto_scores"), "default": False, "metrics": {}},
    "next_token": {"by": "column", "outputs": ("next_token_logprob", "next_token_rank"), "default": True,
                   "metrics": {"next_token_rank": ("sequential_r", "rank of next token"),
                               "next_token_logprob": ("sequential", "log P(next token)")}},
    "input_token": {"by": "column", "outputs": ("input_token_logprob", "input_token_rank"), "default": False,
                    "metrics": {"input_token_rank": ("sequential_r", "rank of input token"),
                                "input_token_logprob": ("sequential", "log P(input token)")}},
}

# What the streamed kernel computes (``targets`` included: columns and user targets are scored through it).
READOUT = tuple(name for name, entry in TABLE.items() if entry["by"] in ("readout", "internal"))
# Per-position tokens scored through ``targets``, in the order their columns come.
COLUMNS = tuple(name for name, entry in TABLE.items() if entry["by"] == "column")
# What a lens request may name.
LENS = tuple(name for name, entry in TABLE.items() if entry["by"] in ("readout", "column"))
DEFAULT_LENS = tuple(name for name in LENS if TABLE[name]["default"])
# [row, batch, pos] metric name -> (colour direction, axis title), in menu order.
METRIC_STYLES = {metric: style for entry in TABLE.values() for metric, style in entry["metrics"].items()}
METRICS = tuple(METRIC_STYLES)
# Result field -> the reduction that fills it (for "add 'x' to reductions=[...]" hints).
FIELD_REDUCTION = {field: name for name, entry in TABLE.items() for field in entry["outputs"]}

__all__ = ["TABLE", "READOUT", "COLUMNS", "LENS", "DEFAULT_LENS", "METRIC_STYLES", "METRICS", "FIELD_REDUCTION"]
