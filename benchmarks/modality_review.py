"""The modality check (`data/modality.py`) on every file of both Kaggle sources, and the sheets a reviewer reads.

For each folder (source, collection, class) it writes a contact sheet (`--sheets`, `<folder>.png`, each tile
numbered and named) of every file the check calls CT, of the MR calls nearest to CT (the thickest bright rings)
and of a seeded random sample of the other MR calls, and lists every file with its answer and evidence (`--out`).
A reviewer looks at the sheets and records what each file shows in `labels/modality_review.csv` (image, modality
seen: mr / ct / other, reviewer). Given that file, the script reports per folder how many reviewed files the
check agrees with (`metrics/modality.json`). Kaggle 2018's second copy (`brain_tumor_dataset/`) is left out.

    python benchmarks/modality_review.py [--nearest 80] [--sample 40] [--sheets DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from braintumor.atomic import write_csv, write_json
from braintumor.data.fetch import find_candidates, kaggle_root
from braintumor.data.images import load_grayscale
from braintumor.data.modality import modality_of
from braintumor.labels import CT, MR, collection_of
from braintumor.params import load_params
from braintumor.stage import configure_logging

log = logging.getLogger("modality_review")
TILE = 128


def folder_of(source: str, original: str) -> str:
    parts = [source, collection_of(source, original), Path(original).parent.name]
    return "-".join(p.replace("/", "-") for p in parts if p)


def measure(params: dict) -> pd.DataFrame:
    rows = []
    for name in ("kaggle2018", "kaggle2020"):
        root = kaggle_root(name, params["fetch"]["sources"][name]["handle"])
        found, _ = find_candidates(name, root, Path("unused"), strict_folders=False)
        for candidate in found:
            if candidate.original.startswith("brain_tumor_dataset/"):
                continue  # the same 253 files again
            data = Path(candidate.src).read_bytes()
            answer = modality_of(load_grayscale(candidate.src))
            rows.append(
                {
                    "image": f"{name}/{candidate.original}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "folder": folder_of(name, candidate.original),
                    "modality": answer.modality,
                    "ring_thickness": round(answer.ring_thickness, 4),
                    "ring_cover": round(answer.ring_cover, 3),
                    "ring_spread": round(answer.ring_spread, 4),
                    "inside_ring": round(answer.inside_ring, 3),
                    "src": candidate.src,
                }
            )
        log.info("%s: measured", name)
    return pd.DataFrame(rows)


def contact_sheet(files: list[tuple[str, str]], out: Path, columns: int = 10) -> None:
    """Tiles of `files` ((label, path) each), the label under each tile."""
    rows = max(1, -(-len(files) // columns))
    sheet = Image.new("L", (columns * TILE, rows * (TILE + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, (label, path) in enumerate(files):
        tile = Image.fromarray(load_grayscale(path))
        tile.thumbnail((TILE, TILE))
        x, y = (k % columns) * TILE, (k // columns) * (TILE + 14)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + TILE + 1), label[:26], fill=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def sheets(measured: pd.DataFrame, nearest: int, sample: int, seed: int, out_dir: Path) -> pd.DataFrame:
    """Per folder, one sheet: every CT call, the `nearest` MR calls with the thickest rings, `sample` other MR
    calls at random. Returns the rows shown, in tile order."""
    shown = []
    rng = np.random.default_rng(seed)
    for folder, mine in measured.groupby("folder"):
        ct = mine[mine.modality == CT].sort_values("ring_thickness", ascending=False)
        mr = mine[mine.modality == MR].sort_values("ring_thickness", ascending=False)
        near, rest = mr.iloc[:nearest], mr.iloc[nearest:]
        picked = rest.iloc[np.sort(rng.choice(len(rest), size=min(sample, len(rest)), replace=False))]
        every = pd.concat([ct, near, picked])
        labels = [f"{k} {row.modality} {Path(row.image).name}" for k, row in enumerate(every.itertuples())]
        contact_sheet(list(zip(labels, every.src, strict=True)), out_dir / f"{folder}.png")
        shown.append(every.assign(tile=range(len(every))))
        log.info(
            "%s: %d CT, %d nearest and %d random of %d MR calls shown", folder, len(ct), len(near), len(picked), len(mr)
        )
    return pd.concat(shown)


def agreement(measured: pd.DataFrame, reviewed: pd.DataFrame) -> dict:
    """Per folder: reviewed files, how many the check agrees with, and the disagreements by name."""
    joined = measured.merge(reviewed[["image", "modality"]].rename(columns={"modality": "reviewed"}), on="image")
    report = {}
    for folder, mine in joined.groupby("folder"):
        wrong = mine[mine.modality != mine.reviewed]
        report[folder] = {
            "reviewed": len(mine),
            "reviewed_ct": int((mine.reviewed == CT).sum()),
            "agree": len(mine) - len(wrong),
            "agreement": round(1 - len(wrong) / len(mine), 4),
            "disagreements": [f"{r.image}: check {r.modality}, reviewer {r.reviewed}" for r in wrong.itertuples()],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nearest", type=int, default=80, help="MR calls nearest to CT shown per folder")
    parser.add_argument("--sample", type=int, default=40, help="other MR calls shown per folder, at random")
    parser.add_argument("--sheets", type=Path, default=Path("benchmarks/data/modality/sheets"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/modality/measured.csv"))
    parser.add_argument("--review", type=Path, default=Path("labels/modality_review.csv"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/modality.json"))
    args = parser.parse_args()
    configure_logging()
    params = load_params()
    measured = measure(params)
    shown = sheets(measured, args.nearest, args.sample, params["seed"], args.sheets)
    write_csv(args.out, measured.drop(columns="src"))
    write_csv(args.out.with_name("shown.csv"), shown.drop(columns="src"))
    counts = measured.groupby(["folder", "modality"]).size().unstack(fill_value=0)
    print(counts.to_string())
    if args.review.is_file():
        report = agreement(measured, pd.read_csv(args.review, dtype=str, keep_default_na=False))
        write_json(args.metrics, {"per_folder": report, "ct_calls": counts.get(CT, pd.Series()).to_dict()})
        for folder, entry in report.items():
            print(f"{folder}: {entry['agree']}/{entry['reviewed']} agree ({entry['reviewed_ct']} CT by eye)")
    print(f"modality: {len(measured)} files, {int((measured.modality == CT).sum())} called CT")


if __name__ == "__main__":
    main()
