"""DVC stage `dedup`: see dvc.yaml; the logic lives in braintumor.dedup."""

import sys

from braintumor.dedup import dedup
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("dedup", dedup))
