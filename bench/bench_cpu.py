"""This CPU's limits: dense matmul peak (torch, fp32 and bf16) and memory bandwidth, with the machine description.

    python bench/bench_cpu.py            # prints JSON
The training MFU and the chat bandwidth bound are measured against these numbers, taken in the same run.
Each figure is the best of several repeats: on a shared machine the best run is the one least disturbed.
The measuring code is machine.py's (the one description of the hardware every report uses).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import machine  # noqa: E402


def run(quick=False):
    return machine.describe(measure=True, quick=quick)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
