"""The label vocabulary every stage shares: which source folders label an image, and the model's classes.

Kept apart from the stages that use it, so that training and inference need not import the fetch code.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Label 1 = tumor, 0 = no tumor.
TUMOR, NO_TUMOR = 1, 0
# (label, subtype) for each class folder name of a source.
CLASS_FOLDERS = {
    "kaggle2018": {"yes": (TUMOR, "unknown"), "no": (NO_TUMOR, "none")},
    "kaggle2020": {
        "glioma_tumor": (TUMOR, "glioma"),
        "meningioma_tumor": (TUMOR, "meningioma"),
        "pituitary_tumor": (TUMOR, "pituitary"),
        "no_tumor": (NO_TUMOR, "none"),
    },
    "local": {
        "tumor": (TUMOR, "unknown"),
        "no_tumor": (NO_TUMOR, "none"),
        "glioma": (TUMOR, "glioma"),
        "meningioma": (TUMOR, "meningioma"),
        "pituitary": (TUMOR, "pituitary"),
    },
}

# What an image shows, as fetch tells it (data/modality.py) or a reviewer records it (labels/modality_review.csv):
# brain MR, head CT, or something else (a body CT, a photograph of film...). The product reads brain MR only.
MR, CT, OTHER_MODALITY = "mr", "ct", "other"
MODALITIES = (MR, CT, OTHER_MODALITY)

# The user's own images (`data/`) and, inside them, a site's: data/site-<name>/<class>/... (`braintumor feedback
# accept` writes them there from readers' verdicts).
LOCAL_SOURCE, SITE_PREFIX = "local", "site-"

BINARY_CLASSES = ["no_tumor", "tumor"]
MULTICLASS_CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]
SUBTYPE_CLASS = {"glioma": "glioma", "meningioma": "meningioma", "none": "no_tumor", "pituitary": "pituitary"}


def class_names(task: str) -> list[str]:
    return BINARY_CLASSES if task == "binary" else MULTICLASS_CLASSES


def class_folder(folders: tuple[str, ...], classes: dict) -> int | None:
    """Index of the innermost of `folders` named after one of `classes` (the one that labels the image), or None."""
    return next((i for i in reversed(range(len(folders))) if folders[i] in classes), None)


def collection_of(source: str, original: str) -> str:
    """The sub-collection of `source` that an image comes from: the folders above its class folder (Kaggle
    2020's `Training` and `Testing`, gathered apart and unlike in look), or "" where there are none."""
    folders = PurePosixPath(original).parts[:-1]
    return "/".join(folders[: class_folder(folders, CLASS_FOLDERS.get(source, {})) or 0])


def site_of(source: str, collection: str) -> str:
    """The site a scan comes from (`site-<name>`, the folder `braintumor feedback accept` wrote it to), or "" for
    the public sources and the user's own class folders."""
    return collection if source == LOCAL_SOURCE and collection.startswith(SITE_PREFIX) else ""
