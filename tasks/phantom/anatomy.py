"""The normal skeleton, organs and soft tissue of one patient, drawn onto a :class:`Canvas`.

Coordinates are millimetres in the patient frame: x to the patient's left (viewer's right on
the anterior view), y down from the vertex. Landmarks are placed as fractions of body height
(standard anthropometric proportions) and widened by frame and habitus, so every patient has
a different but plausible skeleton. Uptake levels follow the normal pattern of a bone scan:
axial skeleton, sacroiliac joints, skull base and joint ends bright; long-bone shafts faint;
kidneys faint; bladder hot; low soft-tissue background.

Besides drawing, :func:`draw_normal` returns *anchors*: places on the skeleton where findings
(metastases, fractures, degenerative change) can be put, with the local bone uptake, so the
findings modules add disease relative to what is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.phantom.canvas import Canvas


@dataclass(frozen=True)
class Body:
    """Per-patient anatomy and physiology drawn from the population.

    Lengths in mm; ``width`` scales the bony frame, ``habitus`` the soft tissue.
    """

    height: float
    sex: str
    bmi: float
    width: float
    habitus: float
    thickness_cm: float
    arm_gap: float
    shoulder_drop: float
    scoliosis: float
    tilt_deg: float
    shift_x: float
    bone_uptake: float
    soft_tissue: float
    kidney_uptake: float
    bladder_fill: float
    bladder_uptake: float
    region_jitter: tuple[float, ...]


def sample_body(rng: np.random.Generator, sex: str, age: float, bmi: float,
                height_m: float) -> Body:
    """Draw a patient's anatomical parameters (deterministic for a given generator state)."""
    habitus = float(np.clip(np.sqrt(bmi / 24.0), 0.8, 1.5))
    width = float(np.clip(rng.normal(1.0 if sex == "M" else 0.93, 0.04), 0.82, 1.15))
    thickness = float(np.clip(21.0 * habitus + rng.normal(0, 1.0), 15, 38))
    return Body(
        height=height_m * 1000.0,
        sex=sex,
        bmi=bmi,
        width=width,
        habitus=habitus,
        thickness_cm=thickness,
        arm_gap=float(rng.uniform(15, 55)),
        shoulder_drop=float(rng.normal(0, 6)),
        scoliosis=float(rng.normal(0, 4 + 8 * max(age - 60, 0) / 30)),
        tilt_deg=float(rng.normal(0, 1.2)),
        shift_x=float(rng.normal(0, 12)),
        bone_uptake=float(np.clip(rng.normal(1.0, 0.12) * (1.1 - 0.004 * (age - 60)), 0.6, 1.5)),
        soft_tissue=float(np.clip(rng.normal(1.0, 0.2), 0.5, 1.8)),
        kidney_uptake=float(np.clip(rng.normal(1.0, 0.35), 0.15, 2.2)),
        bladder_fill=float(rng.uniform(0.6, 1.35)),
        bladder_uptake=float(np.exp(rng.normal(np.log(3.0), 0.5))),
        region_jitter=tuple(float(v) for v in np.clip(rng.normal(1.0, 0.08, 16), 0.75, 1.3)),
    )


@dataclass
class Anchor:
    """A place on the skeleton where a finding can sit."""

    region: str
    x: float
    y: float
    layer: str
    uptake: float
    angle: float = 0.0  # orientation of the bone (deg), for lesions elongated along ribs
    side: int = 0  # -1 right, +1 left, 0 midline
    index: int = 0  # rib or vertebra number


@dataclass
class Anchors:
    """Candidate locations for findings, grouped by region."""

    items: list[Anchor] = field(default_factory=list)

    def add(self, *args, **kwargs) -> None:
        """Append an :class:`Anchor`."""
        self.items.append(Anchor(*args, **kwargs))

    def region(self, *names: str) -> list[Anchor]:
        """Anchors in any of the named regions."""
        return [a for a in self.items if a.region in names]


# Uptake per unit area relative to a thoracic vertebral body (1.0).
UPTAKE = {
    "vertebra": 1.0, "si_joint": 1.25, "sacrum": 0.8, "ilium": 0.42, "iliac_crest": 0.6,
    "acetabulum": 0.75, "pubis": 0.55, "skull": 0.55, "face": 0.6, "mandible": 0.45,
    "sternum": 0.7, "rib": 0.42, "scapula": 0.3, "scap_spine": 0.55, "glenoid": 0.7,
    "clavicle": 0.5, "humeral_head": 0.65, "humerus": 0.28, "elbow": 0.45, "forearm": 0.22,
    "wrist": 0.45, "hand": 0.3, "femoral_head": 0.7, "trochanter": 0.6, "femur": 0.32,
    "knee": 0.65, "patella": 0.45, "tibia": 0.32, "fibula": 0.15, "ankle": 0.6, "foot": 0.5,
    "kidney": 0.2, "soft": 0.1,
}


def draw_normal(cv: Canvas, b: Body, rng: np.random.Generator) -> Anchors:
    """Draw one patient's normal scan into the canvas and return the finding anchors."""
    H, w, hab = b.height, b.width, b.habitus
    j = b.region_jitter
    U = {k: v * b.bone_uptake for k, v in UPTAKE.items()}
    anchors = Anchors()
    tilt = np.deg2rad(b.tilt_deg)

    def P(x: float, y: float) -> tuple[float, float]:
        """Apply the patient's lateral shift and small whole-body tilt."""
        return (b.shift_x + x * np.cos(tilt) - (y - 0.5 * H) * np.sin(tilt),
                y + x * np.sin(tilt))

    def arr(pts) -> np.ndarray:
        return np.array([P(x, y) for x, y in pts], np.float32)

    def spine_x(y: float) -> float:
        """Midline of the spine with a gentle scoliotic curve between T1 and L5."""
        t = (y - 0.19 * H) / (0.33 * H)
        return b.scoliosis * np.sin(np.pi * np.clip(t, 0, 1)) if 0 <= t <= 1 else 0.0

    # ---------------- soft tissue (mid layer, value per area ~ thickness) ----------------
    soft = U["soft"] / b.bone_uptake * b.soft_tissue * (0.8 + 0.4 * hab)
    sw = 0.125 * H * w * (0.85 + 0.25 * hab)  # half width at the shoulders (soft tissue)
    ww = 0.085 * H * hab * (1.0 if b.sex == "M" else 0.95)  # waist
    hw = 0.105 * H * hab * (0.95 if b.sex == "M" else 1.08)  # hips
    torso = [(-sw * 0.55, 0.165 * H), (-sw, 0.195 * H), (-sw * 0.96, 0.27 * H),
             (-ww, 0.40 * H), (-hw, 0.53 * H), (-hw * 0.95, 0.60 * H), (-0.02 * H, 0.625 * H),
             (0.02 * H, 0.625 * H), (hw * 0.95, 0.60 * H), (hw, 0.53 * H), (ww, 0.40 * H),
             (sw * 0.96, 0.27 * H), (sw, 0.195 * H), (sw * 0.55, 0.165 * H)]
    cv.polygon("mid", arr(torso), soft * b.thickness_cm / 10, soft_mm=18)
    cv.ellipse("periph", P(0, 0.065 * H), (78 * w, 112 * w), soft * 1.6, profile="dome")
    cv.tube("periph", arr([(0, 0.11 * H), (0, 0.18 * H)]), 52 * hab, soft * 1.2)
    leg_top = 0.055 * H * hab
    for s in (-1, 1):
        cv.tube("periph", arr([(s * leg_top, 0.62 * H), (s * 0.052 * H, 0.74 * H),
                               (s * 0.047 * H, 0.95 * H)]),
                [70 * hab, 55 * hab, 32 * hab], [soft * 1.4, soft * 1.2, soft * 0.8])
        ax = s * (sw + b.arm_gap + 18 * hab)
        cv.tube("periph", arr([(s * (sw - 10), 0.2 * H), (ax, 0.37 * H), (ax + s * 10, 0.5 * H)]),
                [48 * hab, 40 * hab, 30 * hab], soft * 0.9)
    if b.sex == "F":
        for s in (-1, 1):
            cv.attenuate_anterior(P(s * 0.052 * H, 0.285 * H), (65 * hab, 60 * hab),
                                  float(np.exp(-0.11 * 4.5 * hab)))

    # ---------------- skull ----------------
    cv.ellipse("periph", P(0, 0.062 * H), (73 * w, 102 * w), U["skull"] * 1.9 * j[0],
               profile="shell", inner=0.86)
    cv.ellipse("periph", P(0, 0.105 * H), (40 * w, 22 * w), U["face"] * j[1])  # maxilla/nasal
    cv.blob("periph", P(0, 0.095 * H), (10, 14), U["face"] * 0.8)
    cv.tube("periph", arr([(-42 * w, 0.098 * H), (-36 * w, 0.128 * H), (0, 0.137 * H),
                           (36 * w, 0.128 * H), (42 * w, 0.098 * H)]), 7, U["mandible"])
    anchors.add("skull", *P(rng.uniform(-45, 45), 0.035 * H), "periph", U["skull"])
    for s in (-1, 1):
        anchors.add("skull", *P(s * 62 * w, 0.06 * H), "periph", U["skull"], side=s)

    # ---------------- spine ----------------
    y = 0.132 * H
    heights = [13] * 7 + [18, 19, 20, 21, 22, 22, 23, 24, 24, 25, 26, 26] + [28, 29, 30, 30, 30]
    widths = [22] * 7 + [26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 38] + [40, 42, 44, 46, 48]
    names = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [
        f"L{i}" for i in range(1, 6)]
    scale = (0.52 * H - 0.132 * H) / (sum(heights) * 1.1)
    vert_y: dict[str, float] = {}
    for k, (name, hgt, wid) in enumerate(zip(names, heights, widths, strict=True)):
        hh, ww_ = hgt * scale, wid * w * 0.5
        cy = y + hh / 2
        vert_y[name] = cy
        cx = spine_x(cy)
        val = U["vertebra"] * (0.8 if name.startswith("C") else 1.0) * j[2]
        cv.ellipse("back", P(cx, cy), (ww_, hh / 2 * 1.04), val * 0.95, power=4.0, profile="flat")
        if name.startswith("L") or name.startswith("T"):
            for s in (-1, 1):  # pedicles / facet joints
                cv.blob("back", P(cx + s * ww_ * 0.62, cy - hh * 0.1), 3.5, val * 0.35)
        if name.startswith("L"):
            for s in (-1, 1):  # transverse processes
                cv.tube("back", arr([(cx + s * ww_ * 0.8, cy), (cx + s * ww_ * 1.5, cy - 2)]),
                        3.5, val * 0.35)
        region = "cspine" if name.startswith("C") else "spine"
        anchors.add(region, *P(cx, cy), "back", val, index=k)
        y += hh * 1.1
    # sacrum and coccyx
    sy0, sy1 = 0.52 * H, 0.585 * H
    sac_w = 52 * w
    cv.polygon("back", arr([(-sac_w, sy0), (sac_w, sy0), (16 * w, sy1), (-16 * w, sy1)]),
               U["sacrum"] * j[3])
    for k in range(3):
        anchors.add("pelvis", *P(rng.uniform(-25, 25), sy0 + (k + 0.5) * (sy1 - sy0) / 3.5),
                    "back", U["sacrum"])

    # ---------------- pelvis ----------------
    for s in (-1, 1):
        si_top, si_bot = (s * sac_w * 0.92, sy0 - 4), (s * 28 * w, sy0 + 0.035 * H)
        ilium = [si_top, (s * 62 * w, 0.493 * H), (s * 0.072 * H * w, 0.488 * H),
                 (s * 0.085 * H * w, 0.503 * H), (s * 0.086 * H * w, 0.525 * H),
                 (s * 0.072 * H * w, 0.548 * H), (s * 0.058 * H * w, 0.566 * H),
                 (s * 0.04 * H * w, 0.563 * H), si_bot]
        cv.polygon("mid", arr(ilium), U["ilium"] * j[4])
        cv.tube("mid", arr(ilium[1:6]), 6, U["iliac_crest"] * j[4])
        cv.tube("back", arr([si_top, si_bot]), 7.5, U["si_joint"] * j[5], profile="flat")
        ac = (s * 0.058 * H * w, 0.572 * H)
        cv.ellipse("mid", P(*ac), (20, 22), U["acetabulum"])
        sym = (s * 6, 0.602 * H)
        cv.tube("front", arr([ac, (s * 0.03 * H * w, 0.59 * H), sym]), 8, U["pubis"])
        isch = (s * 0.047 * H * w, 0.612 * H)
        cv.tube("mid", arr([ac, isch, (s * 0.02 * H * w, 0.615 * H), sym]), 9, U["pubis"])
        for _ in range(4):
            t = rng.uniform(0.1, 0.9)
            anchors.add("pelvis", *P(s * (30 + t * 0.045 * H * w), 0.5 * H + t * 0.05 * H),
                        "mid", U["ilium"] * 1.5, side=s)
        anchors.add("pelvis", *P(*ac), "mid", U["acetabulum"], side=s)
        anchors.add("si", *P(*si_bot), "back", U["si_joint"], side=s)

    # ---------------- thorax: sternum, ribs, clavicles, scapulae ----------------
    st_top, st_bot = 0.192 * H, 0.318 * H
    cv.ellipse("front", P(0, st_top + 16), (22 * w, 16), U["sternum"] * 1.1 * j[6], power=3)
    cv.tube("front", arr([(0, st_top + 30), (0, st_bot)]), [15 * w, 12 * w], U["sternum"] * j[6])
    for k in range(3):
        anchors.add("sternum", *P(0, st_top + 20 + k * (st_bot - st_top - 20) / 3), "front",
                    U["sternum"])
    chest = 0.088 * H * w
    profile = [0.5, 0.66, 0.77, 0.85, 0.91, 0.95, 0.98, 1.0, 0.99, 0.95, 0.82, 0.66]
    for i in range(12):
        yv = vert_y[f"T{i + 1}"]
        xs = spine_x(yv)
        W = chest * profile[i]
        d1 = 16 + 3.0 * i
        for s in (-1, 1):
            t = np.linspace(0, 1, 9)
            px = xs + s * (14 * w + (W - 14 * w) * np.sin(t * np.pi / 2) ** 0.9)
            py = yv - 6 * np.sin(np.pi * t) + d1 * t**2
            post = np.stack([px, py], 1)
            val = U["rib"] * j[7] * (1.05 if i < 10 else 0.9)
            cv.tube("back", arr(post), 4.6 * w, val * 0.85)
            for q in (3, 5, 7):
                ang = np.degrees(np.arctan2(py[q + 1] - py[q - 1], (px[q + 1] - px[q - 1])))
                anchors.add("rib", *P(px[q], py[q]), "back", val, angle=ang, side=s, index=i)
            if i >= 10:
                continue
            x_cc = 28 + 6.5 * i
            d2 = 28 + 7.0 * i
            t2 = np.linspace(0, 1, 8)
            ax = s * (W - (W - x_cc * w) * (1 - np.cos(t2 * np.pi / 2)) ** 0.8)
            ay = yv + d1 + d2 * np.sin(t2 * np.pi / 2) ** 1.3
            cv.tube("front", arr(np.stack([ax, ay], 1)), 4.5 * w, val * 0.75)
            cv.blob("front", P(ax[-1], ay[-1]), 4, val * 0.5)  # costochondral junction
            for q in (2, 4):
                ang = np.degrees(np.arctan2(ay[q + 1] - ay[q - 1], ax[q + 1] - ax[q - 1]))
                anchors.add("rib", *P(ax[q], ay[q]), "front", val, angle=ang, side=s, index=i)
    for s in (-1, 1):
        ac_pt = (s * 0.108 * H * w, 0.183 * H + b.shoulder_drop)
        cv.tube("front", arr([(s * 18, 0.193 * H), (s * 0.05 * H * w, 0.188 * H - 5),
                              (s * 0.085 * H * w, 0.185 * H), ac_pt]), 6.5 * w, U["clavicle"])
        cv.blob("front", P(s * 16, 0.194 * H), 6, U["clavicle"] * 0.8)  # sternoclavicular
        glen = (s * 0.113 * H * w, 0.205 * H + b.shoulder_drop)
        scap = [(s * 0.048 * H * w, 0.197 * H), (s * 0.095 * H * w, 0.192 * H), glen,
                (s * 0.1 * H * w, 0.24 * H), (s * 0.068 * H * w, 0.32 * H),
                (s * 0.05 * H * w, 0.27 * H)]
        cv.polygon("back", arr(scap), U["scapula"] * j[8])
        cv.tube("back", arr([(s * 0.05 * H * w, 0.215 * H), ac_pt]), 6, U["scap_spine"] * j[8])
        cv.blob("back", P(*scap[4]), 6, U["scapula"] * 0.8)  # inferior angle
        cv.ellipse("mid", P(*glen), (10, 16), U["glenoid"])
        anchors.add("scapula", *P(*scap[3]), "back", U["scapula"], side=s)
        anchors.add("shoulder", *P(*ac_pt), "front", U["clavicle"], side=s)

        # ---------------- upper limb ----------------
        hx = s * (sw + b.arm_gap * 0.3)
        head = (s * 0.122 * H * w, 0.21 * H + b.shoulder_drop)
        elbow = (hx + s * b.arm_gap * 0.8, 0.37 * H)
        wrist = (elbow[0] + s * (8 + b.arm_gap * 0.3), 0.485 * H)
        cv.ellipse("periph", P(*head), (23 * w, 25 * w), U["humeral_head"] * j[9])
        cv.tube("periph", arr([head, elbow]), [12 * w, 10 * w], U["humerus"] * j[9])
        cv.ellipse("periph", P(*elbow), (22 * w, 14), U["elbow"])
        for off in (-7, 7):
            cv.tube("periph", arr([(elbow[0] + off, elbow[1] + 10), (wrist[0] + off * 1.2,
                                   wrist[1])]), 5.5 * w, U["forearm"])
        cv.ellipse("periph", P(wrist[0], wrist[1] + 10), (20 * w, 14), U["wrist"])
        for f in range(5):
            fx = wrist[0] + (f - 2) * 8 * w
            cv.tube("periph", arr([(fx, wrist[1] + 22), (fx + (f - 2) * 3, wrist[1] + 85 + 8
                                   * (f % 3))]), 3.5, U["hand"] * (1.2 if f == 0 else 1.0))
        anchors.add("humerus", *P(head[0] + (elbow[0] - head[0]) * 0.2,
                                  head[1] + (elbow[1] - head[1]) * 0.2), "periph",
                    U["humerus"] * 1.5, angle=90, side=s)
        anchors.add("shoulder", *P(*head), "periph", U["humeral_head"], side=s)
        anchors.add("elbow", *P(*elbow), "periph", U["elbow"], side=s)
        anchors.add("hand", *P(wrist[0] - s * 14, wrist[1] + 28), "periph", U["hand"], side=s)

        # ---------------- lower limb ----------------
        fh = (s * 0.058 * H * w, 0.573 * H)
        troch = (s * 0.083 * H * w, 0.592 * H)
        knee = (s * (0.047 * H * w + 6 * (hab - 1) * 10), 0.735 * H)
        ankle = (s * 0.045 * H * w, 0.945 * H)
        cv.ellipse("mid", P(*fh), (22 * w, 23 * w), U["femoral_head"] * j[10])
        neck_end = (troch[0] - s * 12, troch[1] - 4)
        cv.tube("mid", arr([fh, neck_end]), 14 * w, U["femoral_head"] * 0.9)
        cv.ellipse("mid", P(*troch), (15 * w, 20), U["trochanter"] * j[10])
        cv.tube("periph", arr([(troch[0] - s * 10, troch[1] + 18), knee]), [14 * w, 13 * w],
                U["femur"] * j[11])
        cv.ellipse("periph", P(knee[0], knee[1] - 12), (33 * w, 22), U["knee"] * j[12])
        cv.ellipse("periph", P(knee[0], knee[1] + 14), (31 * w, 17), U["knee"] * j[12] * 0.9)
        cv.ellipse("front", P(knee[0], knee[1] - 4), (17 * w, 18), U["patella"])
        cv.tube("periph", arr([(knee[0], knee[1] + 28), ankle]), [13 * w, 10 * w],
                U["tibia"] * j[13])
        cv.tube("periph", arr([(knee[0] + s * 26 * w, knee[1] + 26),
                               (ankle[0] + s * 22 * w, ankle[1])]), 4.5, U["fibula"])
        cv.ellipse("periph", P(ankle[0] + s * 4, ankle[1] + 10), (28 * w, 13), U["ankle"])
        cv.ellipse("periph", P(ankle[0] + s * 8, ankle[1] + 30), (24 * w, 14), U["foot"] * j[14])
        for f in range(5):
            fx = ankle[0] + s * (f - 1) * 7 * w
            cv.tube("periph", arr([(fx, ankle[1] + 40), (fx + s * (f - 1) * 2, ankle[1] + 62)]),
                    3.5, U["foot"] * 0.6)
        anchors.add("femur", *P(troch[0] - s * 10, troch[1] + 30), "mid", U["femur"] * 1.6,
                    angle=90, side=s)
        anchors.add("hip", *P(*fh), "mid", U["femoral_head"], side=s)
        anchors.add("knee", *P(knee[0] - s * 12, knee[1] - 2), "periph", U["knee"], side=s)
        anchors.add("foot", *P(ankle[0] + s * 4, ankle[1] + 52), "periph", U["foot"], side=s)

        # ---------------- kidneys ----------------
        ky = 0.415 * H + (0.012 * H if s < 0 else 0)
        kidney = U["kidney"] * b.kidney_uptake / b.bone_uptake
        cv.ellipse("back", P(s * 62 * w, ky), (27, 52), kidney, angle_deg=-s * 14,
                   profile="dome")

    # facet joints of the lower lumbar spine (degenerative change sits here)
    for name in ("L4", "L5"):
        cy = vert_y[name]
        for s in (-1, 1):
            anchors.add("facet", *P(spine_x(cy) + s * 20 * w, cy + 8), "back", U["vertebra"],
                        side=s)

    # ---------------- bladder ----------------
    bw = 42 * b.bladder_fill * hab**0.3
    cv.ellipse("front", P(0, 0.583 * H), (bw, bw * 0.82), b.bladder_uptake * 0.6,
               profile="dome")
    anchors.add("heart", *P(0.026 * H * w, 0.288 * H), "front", 0.0)
    return anchors
