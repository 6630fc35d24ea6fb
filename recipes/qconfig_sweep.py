"""Sweep qconfigs with Hydra's multirun and compare the runs in one table.

Calibration observers x QAT activation averaging constants, one job per combination (one device
per job). Each job leaves its converted model and ``metrics.json`` in ``<sweep dir>/<job>``; the
``SweepSummary`` Hydra callback (``conf/config.yaml``) writes ``summary.md`` / ``summary.csv``
into the sweep directory and prints the table. The same sweep from the shell:

    python train.py -m +quant=qat \\
        quant.calibration.activation.observer.path=percentile,mse \\
        quant.qat.activation.averaging_constant=0.01,0

This script only builds that command line; anything after ``--`` goes to Hydra as is:

    python recipes/qconfig_sweep.py --observers percentile,mse,kl --averaging-constants 0.01,0
    python recipes/qconfig_sweep.py -- float_epochs=2 hydra.sweep.dir=/tmp/my_sweep
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hq_lightning.app.sweep_summary import summarize_sweep


def sweep_arguments(observers: str, averaging_constants: str, extra: list[str]) -> list[str]:
    """The Hydra command line of the sweep."""
    return [
        "-m",
        "+quant=qat",
        f"quant.calibration.activation.observer.path={observers}",
        f"quant.qat.activation.averaging_constant={averaging_constants}",
        *extra,
    ]


def main(argv: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--observers", default="percentile,mse", help="aliases or import paths, comma-separated"
    )
    parser.add_argument("--averaging-constants", default="0.01,0")
    args = parser.parse_args(argv)
    given = [a.split("=", 1)[1] for a in extra if a.startswith("hydra.sweep.dir=")]
    sweep_dir = Path(
        given[-1] if given else f"multirun/qconfig_sweep/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    )
    if not given:
        extra.append(f"hydra.sweep.dir={sweep_dir}")

    from hq_lightning.cli import main as hydra_main

    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *sweep_arguments(args.observers, args.averaging_constants, extra)]
    try:
        hydra_main()
    finally:
        sys.argv = saved_argv
    # the Hydra callback has printed the table and written summary.md; read it back for callers
    print(f"summary: {sweep_dir / 'summary.md'}")
    return summarize_sweep(sweep_dir)


if __name__ == "__main__":
    main()
