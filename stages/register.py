"""DVC stage `register`: see dvc.yaml; the logic lives in the braintumor package."""

import sys

from braintumor.cli import main

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
