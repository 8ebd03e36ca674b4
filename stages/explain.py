"""DVC stage `explain`: see dvc.yaml; the logic lives in braintumor.explanation."""

import sys

from braintumor.explanation import explain
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("explain", explain))
