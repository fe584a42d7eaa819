"""The benchmark's table from a log: the README's performance table is printed by ``--from-log`` from the
per-round lines of a run, so the parsing and the medians it reports are tested here (no model, no timing)."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "bench_logit_lens", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_logit_lens.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_a_stopped_run_gives_its_medians_and_ratios(tmp_path):
    rounds = [("floor", 4.0, 3.0, 600.0), ("lens_plugins", 3.0, 2.0, 650.0), ("floor", 5.0, 4.0, 620.0),
              ("lens_plugins", 4.5, 3.5, 700.0), ("floor", 4.4, 3.2, 610.0), ("lens_plugins", 3.3, 2.2, 640.0)]
    lines = ["Loading weights: 100%"]
    for i, (approach, first, steady, peak) in enumerate(rounds):
        record = {"approach": approach, "tokens": 256, "first": first, "steady": steady, "peak_mb": peak}
        lines.append(f"  round {i // 2 + 1} 256 tokens {approach}: {record}")
    log = tmp_path / "stderr.log"
    log.write_text("\n".join(lines) + "\n")
    medians = bench.rounds_from_log(log)
    assert medians[256]["floor"] == {"first": 4.4, "steady": 3.2, "peak_mb": 610.0, "n": 3, "loads": []}
    assert medians[256]["lens_plugins"]["first"] == 3.3
    row = next(line for line in bench.table(medians, True, {}).splitlines() if line.startswith("| lens_plugins,"))
    assert f"{3.3 / 4.4:.2f}x, {2.2 / 3.2:.2f}x" in row and "+40 MB" in row  # medians 650 and 610 MB
