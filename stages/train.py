"""DVC stage `train`: see dvc.yaml; the logic lives in the braintumor package."""

import sys

from braintumor.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
