"""A study pulled from a PACS over DICOMweb: QIDO-RS finds its series, WADO-RS fetches each series' instances.

`dicomweb-client` does the protocol; the instances come back in the transfer syntax they are stored in (no
transcoding on the server), and are handed to `scans.read_scans` as the files of one study, exactly as a zip or a
folder would be. Limits hold while reading: at most `max_instances` instances and `max_bytes` bytes a study.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit, urlunsplit

from braintumor.errors import SourceError

SERIES_UID = "0020000E"  # (0020,000E) SeriesInstanceUID in DICOM JSON
MAX_INSTANCES = 4096
MAX_BYTES = 2 << 30


def shown(url: str) -> str:
    """`url` without any user name or password, for messages."""
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def study_entries(
    url: str,
    study_uid: str,
    timeout_s: float = 60,
    max_instances: int = MAX_INSTANCES,
    max_bytes: int = MAX_BYTES,
) -> list[tuple[str, str, bytes]]:
    """`read_scans` entries (source, name, bytes) for every instance of `study_uid` on the DICOMweb server at
    `url`; an unreachable server, an unknown study or a study past the limits raises `SourceError` saying which."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    from braintumor.data.dicom import quiet_pydicom

    source = f"{shown(url)} study {study_uid}"
    client = DICOMwebClient(url, timeout=timeout_s)
    try:
        with quiet_pydicom():
            found = client.search_for_series(study_instance_uid=study_uid, get_remaining=True)
            if not found:
                raise SourceError(f"{source}: no such study on the server (QIDO-RS found no series)")
            entries, total = [], 0
            for series in found:
                series_uid = series[SERIES_UID]["Value"][0]
                media = (("application/dicom", "*"),)  # as stored: no transcoding on the server
                for dataset in client.iter_series(study_uid, series_uid, media_types=media):
                    out = io.BytesIO()
                    dataset.save_as(out, enforce_file_format=True)
                    total += out.tell()
                    entries.append((source, f"{source}#{len(entries) + 1}", out.getvalue()))
                    if len(entries) > max_instances or total > max_bytes:
                        raise SourceError(
                            f"{source}: more than {max_instances} instances or {max_bytes} bytes; pull its series "
                            "one at a time, or raise the limits"
                        )
    except requests.RequestException as err:
        status = getattr(err.response, "status_code", None)
        detail = f"HTTP {status}" if status else type(err).__name__
        raise SourceError(
            f"{source}: the DICOMweb server did not answer ({detail}); check the URL and the study UID"
        ) from err
    return entries
