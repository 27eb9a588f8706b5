"""Tell the anterior and posterior frames of a whole-body NM image apart.

Dual-head cameras store both sweeps as two frames of one image; which frame is which is
recorded per detector (DetectorInformationSequence > ViewCodeSequence), and DetectorVector
maps frames to detectors. Vendors fill the code value, the meaning or both, so both are read.
"""

from __future__ import annotations

from typing import Literal

from pydicom.dataset import Dataset

View = Literal["anterior", "posterior"]
ViewSource = Literal["dicom", "assumed"]

# SNOMED CT (and legacy SNOMED-RT) codes for the projections and directions used in NM.
VIEW_CODE_VALUES: dict[str, View] = {
    "399348003": "anterior",   # antero-posterior
    "399300004": "posterior",  # postero-anterior
    "R-10206": "anterior",
    "R-10214": "posterior",
    "255549009": "anterior",   # anterior
    "255551008": "posterior",  # posterior
}
_ANTERIOR_WORDS = {"ap", "a-p", "a/p", "ant", "anterior"}
_POSTERIOR_WORDS = {"pa", "p-a", "p/a", "post", "posterior"}
DETECTOR_VECTOR = 0x00540020


class ViewError(ValueError):
    """The two views cannot be identified; the message is the quarantine reason."""


def view_from_meaning(meaning: str) -> View | None:
    """Read a view from free text: "antero-posterior", "ANT", "AP", "Posterior", ..."""
    text = " ".join(meaning.strip().lower().replace("_", " ").split())
    if text in _ANTERIOR_WORDS or text.startswith(("antero", "anterior")):
        return "anterior"
    if text in _POSTERIOR_WORDS or text.startswith(("postero", "posterior")):
        return "posterior"
    return None


def _detector_view(item: Dataset) -> tuple[View | None, str | None]:
    """The view of one detector item, and a description of what was found (for reasons)."""
    codes = item.get("ViewCodeSequence")
    if not codes:
        return None, None
    code = codes[0]
    value = str(code.get("CodeValue", "") or "").strip()
    meaning = str(code.get("CodeMeaning", "") or "").strip()
    view = VIEW_CODE_VALUES.get(value) or view_from_meaning(meaning)
    return view, (meaning or value or "an empty code")


def identify_views(ds: Dataset, n_frames: int) -> tuple[tuple[int, int], ViewSource]:
    """Return the frame indices of (anterior, posterior) and where that came from.

    Without any view information the frame order anterior, posterior is assumed (and
    recorded as ``"assumed"``); with view information both views must be identified.

    Raises:
        ViewError: view codes present but not one anterior and one posterior.
    """
    detectors = list(ds.get("DetectorInformationSequence") or [])
    if not detectors:
        return (0, 1), "assumed"
    vector = ds.get("DetectorVector")
    pointer = ds.get("FrameIncrementPointer")
    pointers = [] if pointer is None else (list(pointer) if isinstance(pointer, list | tuple)
                                           or hasattr(pointer, "__iter__") else [pointer])
    if vector is not None and len(vector) == n_frames and (
        not pointers or DETECTOR_VECTOR in [int(p) for p in pointers]
    ):
        detector_of_frame = [int(v) - 1 for v in vector]
    else:
        detector_of_frame = list(range(n_frames))
    found: list[tuple[View | None, str | None]] = []
    for index in detector_of_frame:
        if not 0 <= index < len(detectors):
            raise ViewError(
                f"DetectorVector refers to detector {index + 1}, but the header describes "
                f"{len(detectors)}"
            )
        found.append(_detector_view(detectors[index]))
    if all(desc is None for _, desc in found):
        return (0, 1), "assumed"
    views = [v for v, _ in found]
    if sorted(v or "" for v in views) != ["anterior", "posterior"]:
        described = " and ".join(repr(desc) if desc else "no view code" for _, desc in found)
        raise ViewError(
            f"cannot identify an anterior and a posterior view: the frames are {described}"
        )
    return (views.index("anterior"), views.index("posterior")), "dicom"
