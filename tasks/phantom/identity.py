"""Realistic fake patient identities for the phantom's DICOM headers.

The point is to exercise de-identification for real: every value here is something a hospital
header would carry (name, MRN, birth date, address, phone, physicians, accession number), so a
leak anywhere downstream is detectable by scanning for these exact strings.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

from faker import Faker

_LOCALES = {"internal": "en_US", "external": "en_GB"}
LO_MAX = 64  # DICOM LO (Long String, e.g. Patient's Address): at most 64 characters
_SECONDARY_UNIT = re.compile(r" (?:Apt\.|Suite) \d+")


@dataclass(frozen=True)
class FakeIdentity:
    """Everything about a patient and their study that must never leave ingest."""

    patient_name: str  # DICOM PN form: Family^Given^Middle
    patient_id: str
    other_patient_id: str
    birth_date: dt.date
    address: str
    phone: str
    referring_physician: str
    performing_physician: str
    operator: str
    accession_number: str
    study_id: str
    study_date: dt.date
    study_time: str
    station_name: str
    institution_department: str

    def sensitive_values(self) -> list[str]:
        """Values a de-identification audit must never find in any output.

        Dates are given in the DICOM (YYYYMMDD) and ISO forms.
        """
        out: list[str] = []
        for key, value in asdict(self).items():
            if key in {"study_time", "institution_department", "station_name"}:
                continue
            if isinstance(value, dt.date):
                out += [value.strftime("%Y%m%d"), value.isoformat()]
            else:
                out.append(str(value))
                if "^" in str(value):
                    vocab = _dicom_vocabulary()
                    out += [p for p in str(value).split("^")
                            if len(p) >= 4 and p.lower() not in vocab]
        return out


@lru_cache(maxsize=1)
def _dicom_vocabulary() -> frozenset[str]:
    """Words DICOM itself uses (attribute and UID names: "Little" in "Little Endian").

    A surname that is also such a word legitimately appears in de-identified output, so an
    audit searches for it only as part of the full name.
    """
    from pydicom._dicom_dict import DicomDictionary
    from pydicom._uid_dict import UID_dictionary

    names = [v[2] for v in DicomDictionary.values()] + [v[0] for v in UID_dictionary.values()]
    return frozenset(w.lower() for n in names for w in re.findall(r"[A-Za-z]+", n))


def _pn(fake: Faker, sex: str) -> str:
    given = fake.first_name_male() if sex == "M" else fake.first_name_female()
    middle = fake.first_name_male() if sex == "M" else fake.first_name_female()
    return f"{fake.last_name()}^{given}^{middle[0]}"


def _doctor(fake: Faker) -> str:
    return f"{fake.last_name()}^{fake.first_name()}^^Dr."


def fit_address(address: str) -> str:
    """The address as a valid LO value (at most 64 characters).

    Faker's en_US addresses run to 65-66 characters for about 1 person in 5,000 (a long street
    name with a suite number), which the strict DICOM writer refuses: the study profile's 7,800
    patients drew one. A hospital's system would keep the street and drop the unit, so that is
    dropped first; what is still too long is cut at the limit.
    """
    if len(address) <= LO_MAX:
        return address
    return _SECONDARY_UNIT.sub("", address)[:LO_MAX].rstrip(", ")


def make_identity(patient_seed: int, study_seed: int, sex: str, birth_date: dt.date,
                  role: str, study_date: dt.date) -> FakeIdentity:
    """Draw a fake identity deterministically.

    The person (name, IDs, birth date, address, phone) comes from ``patient_seed`` so that a
    follow-up study carries the same identity as the first; the visit (physicians,
    accession number, time, station) comes from ``study_seed``.

    Args:
        patient_seed: per-patient seed.
        study_seed: per-study seed.
        sex: "M" or "F" (names follow it).
        birth_date: the patient's date of birth.
        role: the site's role; external sites use another locale so names and addresses differ.
        study_date: date of the scan.
    """
    locale = _LOCALES.get(role, "en_US")
    person = Faker(locale)
    person.seed_instance(patient_seed)
    visit = Faker(locale)
    visit.seed_instance(study_seed)
    mrn = f"{person.random_uppercase_letter()}{person.random_number(digits=8, fix_len=True)}"
    return FakeIdentity(
        patient_name=_pn(person, sex),
        patient_id=mrn,
        other_patient_id=f"NHS{person.random_number(digits=9, fix_len=True)}",
        birth_date=birth_date,
        address=fit_address(person.address().replace("\n", ", ")),
        phone=person.numerify("(###) ###-####"),
        referring_physician=_doctor(visit),
        performing_physician=_doctor(visit),
        operator=f"{visit.last_name()}^{visit.first_name()}",
        accession_number=f"ACC{visit.random_number(digits=10, fix_len=True)}",
        study_id=str(visit.random_number(digits=6, fix_len=True)),
        study_date=study_date,
        study_time=(f"{visit.random_int(7, 17):02d}{visit.random_int(0, 59):02d}"
                    f"{visit.random_int(0, 59):02d}"),
        station_name=f"NM{visit.random_int(1, 4)}-{visit.lexify('????').upper()}",
        institution_department="Nuclear Medicine",
    )
