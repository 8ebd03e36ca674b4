"""What a user hands `braintumor predict` or `serve`, read into series of 8-bit slices.

An image file (JPEG, PNG, ...) is a series of one slice. DICOM objects are grouped by SeriesInstanceUID (a folder
is not a series: two series can share one) and ordered along the slice normal (`dicom.frame_positions`),
InstanceNumber when positions are missing. A NIfTI volume is one series: its axial brain slices
(`volumes.brain_slices`). A `.zip` (a study export) is opened in memory and its members read as if given one by
one, after its central directory has shown that it stays inside the limits (a zip bomb is never inflated).

Nothing identifying leaves this module: a DICOM series and its study are named by a salted hash of their UIDs
(`series_salt`), never by a patient's name, an id, a date or a folder name; DICOM files that cannot be read are
named by the argument or upload they came with and their position in it, since the folders of a hospital export
are often named after the patient.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import secrets
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from braintumor.data.dicom import DicomImage, is_dicom, read_dicom
from braintumor.data.images import MAX_COLOURFULNESS, open_image, to_grayscale
from braintumor.data.modality import Refusal, reading_refusal
from braintumor.data.volumes import brain_slices, read_nifti
from braintumor.errors import ImageReadError, VolumeTooLarge

NIFTI_PLANE = "axial"  # the plane most training scans are cut in
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A zip (one study) may hold at most this many members and inflate to at most this many bytes, read from its
# central directory before any member is inflated; members are read back no larger than they said.
MAX_ZIP_MEMBERS = 4096
MAX_ZIP_BYTES = 2 << 30
SALT_ENV = "BRAINTUMOR_SERIES_SALT"
SALT_FILE = Path("~/.config/braintumor/series-salt")


@dataclass
class Series:
    """Slices that are answered together, and what an answer may say of where they came from."""

    name: str  # an image: its file name as given; DICOM and NIfTI: "series-<salted hash>"
    kind: str  # "image", "dicom" or "nifti"
    source: str  # the argument or upload it came with
    slices: list[np.ndarray] = field(default_factory=list)  # 8-bit grayscale, in series order
    refusal: Refusal | None = None  # why the whole series is no brain MR (colour, modality): answered unscored
    study: str | None = None  # DICOM: "study-<salted hash>"
    patient: str | None = None  # DICOM: "patient-<salted hash>" of PatientID (what keeps a patient in one split)
    files: int = 1
    inputs: list[int] = field(default_factory=list)  # the entries it came from (a zip's members: the zip's)


def series_salt() -> bytes:
    """The local secret that series names are hashed with: `BRAINTUMOR_SERIES_SALT`, else a random one kept in
    ~/.config/braintumor/series-salt (created on first use, readable by its owner only). The same salt names the
    same series alike on every run; without it a name cannot be traced back to a UID by hashing known UIDs."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode()
    return file_salt(SALT_FILE.expanduser())


@functools.cache
def file_salt(path: Path) -> bytes:
    """The salt kept at `path`, made there first if need be; read once a process (every request hashes with it)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_hex(32))
        except FileExistsError:  # another process made it first
            pass
    return path.read_text().strip().encode()


def hashed(prefix: str, uid: str, salt: bytes) -> str:
    return f"{prefix}-{hashlib.sha256(salt + b':' + uid.encode()).hexdigest()[:16]}"


def kind_of(name: str, data: bytes) -> str:
    """ "dicom", "nifti", "zip" or "image" (anything else is tried as an image and refused with its reason)."""
    if is_dicom(data):
        return "dicom"
    if name.lower().endswith(NIFTI_SUFFIXES):
        return "nifti"
    if data[:4] == b"PK\x03\x04" and name.lower().endswith(".zip"):
        return "zip"
    return "image"


def is_clinical(path: Path) -> bool:
    """A DICOM file, a NIfTI volume or a zip (read as series), by its first bytes and name; False for a file that
    cannot be opened (its reader reports why)."""
    try:
        with open(path, "rb") as stream:
            return kind_of(path.name, stream.read(132)) != "image"
    except OSError:
        return False


def kind_suffix(name: str) -> str:
    """The suffix that says what a clinical file is, kept where a file is shown by position instead of name."""
    return next((s for s in (*NIFTI_SUFFIXES, ".zip") if name.lower().endswith(s)), "")


def zip_members(name: str, data: bytes, max_file_bytes: int) -> list[tuple[str, bytes]]:
    """The files of a zip, named `<zip>#<position>` (member names are not shown: exports put patients in them);
    refused whole, before inflating, past MAX_ZIP_MEMBERS, MAX_ZIP_BYTES or `max_file_bytes` a member."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ImageReadError(name, "not_a_zip", f"a .zip that cannot be opened ({err})") from err
    total = sum(info.file_size for info in members)
    largest = max((info.file_size for info in members), default=0)
    if len(members) > MAX_ZIP_MEMBERS or total > MAX_ZIP_BYTES or largest > max_file_bytes:
        raise ImageReadError(
            name,
            "too_large",
            f"{len(members)} files inflating to {total} bytes (largest {largest}); the limits are "
            f"{MAX_ZIP_MEMBERS} files, {MAX_ZIP_BYTES} bytes, {max_file_bytes} bytes a file: send fewer series",
        )
    found = []
    for position, info in enumerate(members):
        try:
            with archive.open(info) as member:
                content = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError) as err:
            raise ImageReadError(name, "truncated_or_corrupt", f"member {position}: {err}") from err
        if len(content) > info.file_size:
            raise ImageReadError(name, "truncated_or_corrupt", f"member {position} is larger than its header says")
        found.append((f"{name}#{position}", content))
    return found


def read_scans(
    entries: Iterable[tuple[str, str, bytes]], max_pixels: int | None, max_file_bytes: int = 1 << 62
) -> tuple[list[Series], list[tuple[int, str, str]]]:
    """Series from (source, name, bytes) entries, in the order they first appear, and (entry, name, error) for
    each entry that cannot be read. `source` is the argument or upload an entry came with; `name` is what its
    image answer and its read error are called (the caller keeps patient names out of it). An entry (or a zip's
    member) over `max_file_bytes` is an error, refused before it is parsed."""
    salt = series_salt()
    series: list[Series] = []
    errors: list[tuple[int, str, str]] = []
    dicom: dict[str, list[DicomImage]] = {}
    dicom_series: dict[str, Series] = {}
    pending = [(index, *entry) for index, entry in enumerate(entries)]
    while pending:
        index, source, name, data = pending.pop(0)
        try:
            if len(data) > max_file_bytes:
                raise ImageReadError(name, "too_large", f"more than {max_file_bytes} bytes, the limit for one file")
            kind = kind_of(name, data)
            if kind == "zip":
                members = zip_members(name, data, max_file_bytes)
                pending[:0] = [(index, source, member, content) for member, content in members]
            elif kind == "dicom":
                image = read_dicom(name, data, max_pixels)
                key = image.series_uid or name
                if key not in dicom_series:
                    dicom_series[key] = Series(
                        hashed("series", key, salt),
                        "dicom",
                        source,
                        study=hashed("study", image.study_uid, salt) if image.study_uid else None,
                        patient=hashed("patient", image.patient_id, salt) if image.patient_id else None,
                        files=0,
                    )
                    series.append(dicom_series[key])
                    dicom[key] = []
                dicom[key].append(image)
                dicom_series[key].files += 1
                dicom_series[key].inputs += [] if index in dicom_series[key].inputs else [index]
            elif kind == "nifti":
                series.append(nifti_series(source, name, data, salt))
                series[-1].inputs = [index]
            else:
                img = open_image(name, data=data, max_pixels=max_pixels)
                gray = to_grayscale(img)
                series.append(Series(name, "image", source, [gray], reading_refusal(img, gray), inputs=[index]))
        except ImageReadError as err:
            errors.append((index, err.path, f"{err.reason}: {err.detail}"))
        except Exception as err:  # noqa: BLE001 - one bad file never fails the others
            errors.append((index, name, f"{type(err).__name__}: {err}"))
    for key, images in dicom.items():
        order_dicom_series(dicom_series[key], images)
    return series, errors


def nifti_series(source: str, name: str, data: bytes, salt: bytes) -> Series:
    try:
        volume = read_nifti(data)
        slices = [pixels for _, pixels in brain_slices(volume, NIFTI_PLANE)]
    except VolumeTooLarge as err:
        raise ImageReadError(name, "too_large", str(err)) from err
    except Exception as err:  # noqa: BLE001 - a bad header, a truncated body, not 3-D, empty
        raise ImageReadError(name, "unreadable_volume", f"{type(err).__name__}: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
    return Series(hashed("series", digest, salt), "nifti", source, slices)


def order_dicom_series(series: Series, images: list[DicomImage]) -> None:
    """Fill `series.slices` in anatomical order, and refuse a series that is not MR or is in colour."""
    frames = [
        (position, image.instance, k, n, frame)
        for k, image in enumerate(images)
        for n, (frame, position) in enumerate(zip(image.frames, image.positions, strict=True))
    ]
    if all(position is not None for position, *_ in frames):
        frames.sort(key=lambda f: (f[0], f[2], f[3]))
    elif all(instance is not None for _, instance, *_ in frames):
        frames.sort(key=lambda f: (f[1], f[2], f[3]))
    series.slices = [frame for *_, frame in frames]
    modalities = sorted({image.modality for image in images if image.modality})
    colour = max(image.colourfulness for image in images)
    if modalities and modalities != ["MR"]:
        series.refusal = Refusal(
            "not_mr_modality", f"a {'/'.join(modalities)} series (DICOM Modality); only MR series are read"
        )
    elif colour >= MAX_COLOURFULNESS:
        series.refusal = Refusal(
            "colour",
            f"a colour series (colourfulness {colour:.0f}, refused from {MAX_COLOURFULNESS:.0f}); MR slices are "
            "grayscale",
        )
