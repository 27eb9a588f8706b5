"""Rasterise anatomical primitives into depth layers of an activity map.

The phantom is drawn as an "ideal projection": activity per unit area, in the anterior-view
orientation, split into a few depth layers. The physics step (:mod:`tasks.phantom.physics`)
then attenuates and blurs each layer according to its distance from each detector head, which
is what makes posterior structures sharper on the posterior view and vice versa.

Every primitive is evaluated only inside its bounding box, so a whole skeleton of a few
hundred primitives renders in tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.path import Path as MplPath
from scipy.ndimage import gaussian_filter

LAYERS = ("front", "mid", "back", "periph")
"""Depth layers: in front of / inside / behind the torso's mid-plane, and the limbs + head."""


def _smooth_edge(signed_inside: np.ndarray, soft: float) -> np.ndarray:
    """Soft 0..1 edge from a signed distance (pixels, positive inside)."""
    return np.clip(signed_inside / soft + 0.5, 0.0, 1.0)


@dataclass
class Canvas:
    """Activity layers for one patient, with the mm -> pixel mapping of the site's camera.

    Attributes:
        rows, cols: matrix size of one view.
        pixel_mm: pixel spacing.
        origin: (x_mm, y_mm) of the patient coordinate origin (vertex, midline) in pixels
            expressed as (col, row).
    """

    rows: int
    cols: int
    pixel_mm: float
    origin: tuple[float, float]
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    ant_transmission: np.ndarray | None = None
    """Extra anterior-only transmission (breast tissue), multiplied into the anterior view."""

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = {name: np.zeros((self.rows, self.cols), np.float32) for name in LAYERS}
        if self.ant_transmission is None:
            self.ant_transmission = np.ones((self.rows, self.cols), np.float32)

    # --- coordinates -------------------------------------------------------------------
    def to_px(self, x_mm: np.ndarray | float, y_mm: np.ndarray | float) -> tuple:
        """Patient mm (x to the patient's left, y down from the vertex) -> (col, row)."""
        return (self.origin[0] + np.asarray(x_mm) / self.pixel_mm,
                self.origin[1] + np.asarray(y_mm) / self.pixel_mm)

    def mm(self, length_mm: float) -> float:
        """A length in pixels."""
        return length_mm / self.pixel_mm

    def _box(self, cmin: float, cmax: float, rmin: float, rmax: float):
        c0, c1 = max(int(np.floor(cmin)) - 1, 0), min(int(np.ceil(cmax)) + 2, self.cols)
        r0, r1 = max(int(np.floor(rmin)) - 1, 0), min(int(np.ceil(rmax)) + 2, self.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        cc, rr = np.meshgrid(np.arange(c0, c1, dtype=np.float32) + 0.0,
                             np.arange(r0, r1, dtype=np.float32) + 0.0)
        return (slice(r0, r1), slice(c0, c1)), cc, rr

    def _rotated_frame(self, cx: float, cy: float, extent: float, angle_deg: float):
        """Pixel box around (cx, cy) and each pixel's coordinates along / across ``angle``."""
        box = self._box(cx - extent, cx + extent, cy - extent, cy + extent)
        if box is None:
            return None
        sl, cc, rr = box
        th = np.deg2rad(angle_deg)
        du, dv = cc - cx, rr - cy
        return sl, du * np.cos(th) + dv * np.sin(th), -du * np.sin(th) + dv * np.cos(th)

    # --- primitives (all coordinates in mm, values are activity per unit area) -------------
    def tube(self, layer: str, pts_mm: np.ndarray, radius_mm, value, profile: str = "dome",
             soft: float = 0.8) -> None:
        """A polyline with per-vertex radius and value (long bones, ribs, clavicles...).

        The distance to the nearest segment decides membership, so joints between segments
        are not counted twice. ``profile`` "dome" thickens the centre like a projected
        cylinder; "flat" is uniform.
        """
        pts = np.asarray(pts_mm, np.float32)
        n = len(pts)
        rad = np.broadcast_to(np.asarray(radius_mm, np.float32), (n,)) / self.pixel_mm
        val = np.broadcast_to(np.asarray(value, np.float32), (n,))
        c, r = self.to_px(pts[:, 0], pts[:, 1])
        pad = float(rad.max()) + 2
        box = self._box(c.min() - pad, c.max() + pad, r.min() - pad, r.max() + pad)
        if box is None:
            return
        sl, cc, rr = box
        best_d = np.full(cc.shape, np.inf, np.float32)
        best_t = np.zeros(cc.shape, np.float32)
        best_k = np.zeros(cc.shape, np.intp)
        for k in range(n - 1):
            ax, ay = c[k], r[k]
            bx, by = c[k + 1] - ax, r[k + 1] - ay
            px, py = cc - ax, rr - ay
            t = np.clip((px * bx + py * by) / max(bx * bx + by * by, 1e-6), 0.0, 1.0)
            dx, dy = px - t * bx, py - t * by
            d = np.sqrt(dx * dx + dy * dy)
            closer = d < best_d
            best_d = np.where(closer, d, best_d)
            best_t = np.where(closer, t, best_t)
            best_k = np.where(closer, k, best_k)
        k, tk, dk = best_k, best_t, best_d
        rk = rad[k] * (1 - tk) + rad[k + 1] * tk
        vk = val[k] * (1 - tk) + val[k + 1] * tk
        inside = _smooth_edge(rk - dk, soft)
        if profile == "dome":
            shape = 0.55 + 0.45 * np.sqrt(np.clip(1 - (dk / np.maximum(rk, 1e-3)) ** 2, 0, 1))
            inside = inside * shape
        self.layers[layer][sl] += (vk * inside).astype(np.float32)

    def ellipse(self, layer: str, center_mm, axes_mm, value: float, angle_deg: float = 0.0,
                profile: str = "dome", power: float = 2.0, inner: float = 0.0) -> None:
        """An ellipse / superellipse.

        Profiles: "flat"; "dome" (projected ellipsoid: organs, vertebral bodies);
        "shell" (projected hollow ellipsoid with inner radius fraction ``inner``: calvarium,
        myocardium - brighter at the rim, as a projected shell is).
        """
        cx, cy = self.to_px(*center_mm)
        a, b = axes_mm[0] / self.pixel_mm, axes_mm[1] / self.pixel_mm
        frame = self._rotated_frame(cx, cy, max(a, b) + 2, angle_deg)
        if frame is None:
            return
        sl, u, v = frame
        rho = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1.0 / power)
        edge = _smooth_edge((1 - rho) * min(a, b), 0.8)
        if profile == "flat":
            out = edge
        elif profile == "dome":
            out = edge * np.sqrt(np.clip(1 - rho**2, 0, 1)) ** 0.6
        elif profile == "shell":
            outer = np.sqrt(np.clip(1 - rho**2, 0, 1))
            inn = np.sqrt(np.clip(inner**2 - rho**2, 0, 1))
            out = edge * (outer - inn) / max(np.sqrt(1 - inner**2), 1e-3)
        else:
            raise ValueError(f"unknown profile {profile!r}")
        self.layers[layer][sl] += (value * out).astype(np.float32)

    def polygon(self, layer: str, verts_mm: np.ndarray, value: float, soft_mm: float = 2.5
                ) -> None:
        """A filled polygon (iliac wings, scapulae, sacrum, the torso's outline).

        The edge is softened over ``soft_mm`` (bone edges are not cut with a knife, and a
        body's projected thickness falls off towards its outline).
        """
        verts = np.asarray(verts_mm, np.float32)
        c, r = self.to_px(verts[:, 0], verts[:, 1])
        pad = 3 * soft_mm / self.pixel_mm + 1
        box = self._box(c.min() - pad, c.max() + pad, r.min() - pad, r.max() + pad)
        if box is None:
            return
        sl, cc, rr = box
        path = MplPath(np.stack([c, r], 1))
        pts = np.stack([cc.ravel(), rr.ravel()], 1)
        inside = path.contains_points(pts, radius=0.0).reshape(cc.shape).astype(np.float32)
        if soft_mm > 0:
            inside = gaussian_filter(inside, soft_mm / self.pixel_mm, mode="constant")
        self.layers[layer][sl] += value * inside

    def blob(self, layer: str, center_mm, sigma_mm, value: float, angle_deg: float = 0.0) -> None:
        """A Gaussian spot (lesions, hot spots). ``sigma_mm`` is a number or (along, across)."""
        sx, sy = (sigma_mm, sigma_mm) if np.isscalar(sigma_mm) else sigma_mm
        cx, cy = self.to_px(*center_mm)
        sxp, syp = sx / self.pixel_mm, sy / self.pixel_mm
        frame = self._rotated_frame(cx, cy, 3.2 * max(sxp, syp) + 1, angle_deg)
        if frame is None:
            return
        sl, u, v = frame
        g = np.exp(-0.5 * ((u / sxp) ** 2 + (v / syp) ** 2))
        self.layers[layer][sl] += (value * g).astype(np.float32)

    def attenuate_anterior(self, center_mm, axes_mm, factor: float) -> None:
        """Lower the anterior view's transmission in an elliptical region (breast tissue)."""
        cx, cy = self.to_px(*center_mm)
        a, b = axes_mm[0] / self.pixel_mm, axes_mm[1] / self.pixel_mm
        box = self._box(cx - a - 2, cx + a + 2, cy - b - 2, cy + b + 2)
        if box is None:
            return
        sl, cc, rr = box
        rho = np.sqrt(((cc - cx) / a) ** 2 + ((rr - cy) / b) ** 2)
        w = np.clip(1 - rho, 0, 1) ** 0.5
        self.ant_transmission[sl] *= (1 - w * (1 - factor)).astype(np.float32)
