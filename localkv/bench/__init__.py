"""``localkv bench``: speed at real shapes against the machine's measured ceilings and a peer.

    shapes.py     named architectures (llama3-8b, llama3.2-1b, smollm2-135m) -> ModelArgs
    model.py      a random-weight model of a shape, built on the target device without a second copy
    ceilings.py   HBM copy, pinned H2D, host memcpy and disk read bandwidth, measured in the same run
    floor.py      the decode floor: every byte a step must read, once, at those rates
    synthetic.py  KV written straight into the tiers when a real prefill would take too long
    measure.py    timing of a chunked prefill and of decode steps
    peer_hf.py    Hugging Face transformers on the same weights: full and offloaded DynamicCache
    rows.py       a result row from timings and a cache's stats(), with its floor
    runner.py     BenchConfig -> run_bench -> {"meta", "ceilings", "rows"}
    report.py     the table and the JSON
    plot.py       ms/token against context as a PNG (png.py encodes it, font.py draws its labels)
"""

from .plot import plot_result
from .report import table, write_json
from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench", "table", "write_json", "plot_result"]
