"""DVC stage `split`: see dvc.yaml; the logic lives in braintumor.splitting."""

import sys

from braintumor.splitting import split
from braintumor.stage import run

if __name__ == "__main__":
    sys.exit(run("split", split))
