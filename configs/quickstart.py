"""The README's main job: configs/gpqa.py:quickstart, offline on the embedded model.

  python -m launch.train --config=configs/quickstart.py

Trains shared DiffMAS adapters (4 agents, m = 4) on 32 sampled MATH train
problems (those whose prompt fits the configured length are kept: 26, i.e. 7
updates of 4 micro-steps), then evaluates single / text_mas / latent_mas /
diffmas on the first 20 ARC-Challenge test items (the offline stand-in for
GPQA-Diamond). About 10 minutes on a 2-core CPU.
"""

from configs import gpqa


def get_config(arg: str | None = None):
  del arg
  return gpqa.get_config("quickstart")
