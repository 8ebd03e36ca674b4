"""DVC stage `train`: see dvc.yaml; the logic lives in braintumor.training."""

import sys

from braintumor.stage import run
from braintumor.training import train

if __name__ == "__main__":
    sys.exit(run("train", train))
