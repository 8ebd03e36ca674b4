"""DVC stage `register`: see dvc.yaml; the logic lives in braintumor.registry."""

import sys

from braintumor.registry import register
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("register", register))
