"""Realistic fake patient identities for the phantom's DICOM headers.

The point is to exercise de-identification for real: every value here is something a hospital
header would carry (name, MRN, birth date, address, phone, physicians, accession number), so a
leak anywhere downstream is detectable by scanning for these exact strings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from faker import Faker

_LOCALES = {"internal": "en_US", "external": "en_GB"}


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
                    out += [p for p in str(value).split("^") if len(p) >= 4]
        return out


def _pn(fake: Faker, sex: str) -> str:
    given = fake.first_name_male() if sex == "M" else fake.first_name_female()
    middle = fake.first_name_male() if sex == "M" else fake.first_name_female()
    return f"{fake.last_name()}^{given}^{middle[0]}"


def _doctor(fake: Faker) -> str:
    return f"{fake.last_name()}^{fake.first_name()}^^Dr."


def make_identity(seed: int, sex: str, age_years: float, role: str, study_date: dt.date) -> FakeIdentity:
    """Draw a fake identity deterministically from ``seed``.

    Args:
        seed: per-patient seed; the same seed gives the same identity.
        sex: "M" or "F" (names follow it).
        age_years: age at the study, used to place the birth date.
        role: the site's role; external sites use another locale so names and addresses differ.
        study_date: date of the scan.
    """
    fake = Faker(_LOCALES.get(role, "en_US"))
    fake.seed_instance(seed)
    days = int(round(age_years * 365.25)) + fake.random_int(0, 364)
    birth = study_date - dt.timedelta(days=days)
    mrn = f"{fake.random_uppercase_letter()}{fake.random_number(digits=8, fix_len=True)}"
    return FakeIdentity(
        patient_name=_pn(fake, sex),
        patient_id=mrn,
        other_patient_id=f"NHS{fake.random_number(digits=9, fix_len=True)}",
        birth_date=birth,
        address=fake.address().replace("\n", ", "),
        phone=fake.numerify("(###) ###-####"),
        referring_physician=_doctor(fake),
        performing_physician=_doctor(fake),
        operator=f"{fake.last_name()}^{fake.first_name()}",
        accession_number=f"ACC{fake.random_number(digits=10, fix_len=True)}",
        study_id=str(fake.random_number(digits=6, fix_len=True)),
        study_date=study_date,
        study_time=f"{fake.random_int(7, 17):02d}{fake.random_int(0, 59):02d}{fake.random_int(0, 59):02d}",
        station_name=f"NM{fake.random_int(1, 4)}-{fake.lexify('????').upper()}",
        institution_department="Nuclear Medicine",
    )
