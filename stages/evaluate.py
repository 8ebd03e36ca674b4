"""DVC stage `evaluate`: see dvc.yaml; the logic lives in braintumor.evaluation."""

import sys

from braintumor.evaluation import evaluate
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("evaluate", evaluate))
