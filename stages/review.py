"""DVC stage `review`: see dvc.yaml; the logic lives in braintumor.review."""

import sys

from braintumor.review import review
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("review", review))
