"""python -m pipeline.quant.kernels --build: compile every csrc/*.cpp for this CPU (make setup runs it).

Never fails setup: a source that does not build is reported, and the layers its kernel would
compute run the next kernel in the registry (the layer table's notes say so); without gptq_sweep,
GPTQ sweeps its columns in torch ops (a warning says so).
"""

from __future__ import annotations

import argparse

from pipeline.quant.kernels import cpp

FALLBACK_LINEAR = "the layers it would compute run the next kernel in the registry (see the layer table's notes)"
FALLBACK = {"gptq_sweep": "GPTQ's column sweep runs in torch ops instead: the same codes, 1.7-15x slower"}


def main() -> None:
    parser = argparse.ArgumentParser(description="Build our C++ kernels for this CPU (never fails setup).")
    parser.add_argument("--build", action="store_true", help="compile every csrc/*.cpp now (else on first use)")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    for source in sorted(cpp.SOURCES.glob("*.cpp")):
        outcome = cpp.build(source.stem)
        print(f"kernel {source.stem}: {outcome.describe()}")
        if not outcome.ok:
            print(f"  {FALLBACK.get(source.stem, FALLBACK_LINEAR)}")


if __name__ == "__main__":
    main()
