"""DVC stage `fetch`: see dvc.yaml; the logic lives in braintumor.sources."""

import sys

from braintumor.sources import fetch
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("fetch", fetch))
