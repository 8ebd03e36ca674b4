"""DVC stage `explain`: see dvc.yaml; the logic lives in braintumor.quality.explain."""

import sys
from pathlib import Path

# This checkout's code, not whichever copy of the package is installed: `dvc exp run --queue` runs a stage in a
# temporary copy of the repository, and DVC's deps are the files of that copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from braintumor.stage import quiet_native_output, run  # noqa: E402

if __name__ == "__main__":
    quiet_native_output()  # before the stage's imports load TensorFlow
from braintumor.quality.explain import explain  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("explain", explain))
