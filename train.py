"""Train, calibrate, QAT and convert with hq_lightning's Hydra app.

    python train.py +quant=qat march=bayes      # the main job
    python train.py                             # float training only
    python train.py -m +quant=qat quant.qat.activation.averaging_constant=0.01,0.1

Same as the ``hq-train`` console script; the configs are in ``conf/`` (docs/app.md).
"""

from hq_lightning.cli import main

if __name__ == "__main__":
    main()
