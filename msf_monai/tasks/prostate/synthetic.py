"""Built-in synthetic multi-site prostate MRI demo data.

The generator draws, for every case, a random pelvis (body outline, subcutaneous and pelvic
fat, muscles, femoral heads, pubic bones, bladder, rectum, seminal vesicles and an irregular
prostate gland with a bright peripheral zone and a darker textured central gland) from ONE
anatomy sampler shared by all sites.  Each site then "acquires" the anatomy with its own
style: tissue-contrast transfer curve (gamma, sigmoid contrast, fat suppression, fluid
suppression), global scale and offset, smooth multiplicative bias field (optionally an
endorectal-coil-like hot spot), Rician noise and Gaussian point-spread blur.  Sites therefore
differ only in acquisition, never in anatomy statistics, which is the setting of single-source
domain generalisation.

Files are written in the per-site layout of the public 6-site multi-site prostate set::

    <root>/<Site>/CaseNN.nii.gz               int16 T2-like image, RAS affine, mm
    <root>/<Site>/CaseNN_segmentation.nii.gz  uint8 label, 1 = whole prostate gland
    <root>/demo_info.json                     generator version, parameters, case list

Case numbers are unique over the whole demo set (the source site holds Case00..Case15 by
default, the next site continues the numbering), so a case id names one synthetic patient.

Only numpy and nibabel are needed; all filtering is done with FFTs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...data.demo_install import DEMO_INFO_FILE, demo_summary, install_demo, write_demo_info

__all__ = [
    "DEMO_SOURCE_SITE",
    "DEMO_SITES",
    "GENERATOR_VERSION",
    "SITE_STYLES",
    "default_cases_per_site",
    "generate_demo_prostate",
    "ensure_demo_prostate",
    "sample_anatomy",
    "acquire",
]

logger = logging.getLogger("msf_monai.data")

GENERATOR_VERSION = "1.0"
#: the generator's name in demo_info.json (its module before 0.6.0; kept, so existing demo folders stay current)
_GENERATOR = "msf_monai.data.synthetic_prostate"
DEMO_SOURCE_SITE = "SiteA"
DEMO_SITES: tuple[str, ...] = ("SiteA", "SiteB", "SiteC", "SiteD")
DEFAULT_SHAPE = (96, 96, 20)
#: field of view in mm (left-right, posterior-anterior, inferior-superior); the voxel spacing
#: is ``fov_mm / shape`` (2.0 x 2.0 x 3.6 mm for the default shape), like a cropped pelvic
#: T2 acquisition (real scans: about 190 mm in-plane, 15-24 slices of 3-4 mm).
DEFAULT_FOV_MM = (192.0, 192.0, 72.0)
DEFAULT_SOURCE_CASES = 16
DEFAULT_TARGET_CASES = 6

#: Acquisition style of each preset site.  Keys:
#:   fat_level      latent signal of fat (0.85: T2 fast spin echo; small: fat suppressed)
#:   gamma          power applied to the latent tissue signal (contrast curve)
#:   sigmoid_k/c    optional sigmoid contrast stretch (k=0: off) around latent level c
#:   fluid_suppression  0..1, darkens free fluid (urine), FLAIR-like partial inversion
#:   scale, offset  scanner units: image = scale * bias * signal + offset
#:   bias           amplitude (log domain) of the smooth multiplicative bias field
#:   coil_gain      extra gain of an endorectal-coil-like hot spot behind the prostate
#:   noise          Rician noise sigma as a fraction of ``scale``
#:   blur_mm        in-plane Gaussian PSF sigma in mm (through-plane uses half of it)
SITE_STYLES: dict[str, dict[str, float]] = {
    # source: standard T2 FSE, mild bias, low noise, sharp
    "SiteA": dict(fat_level=0.85, gamma=1.0, sigmoid_k=0.0, sigmoid_c=0.5, fluid_suppression=0.0,
                  scale=1000.0, offset=0.0, bias=0.12, coil_gain=0.0, noise=0.015, blur_mm=0.5),
    # compressed contrast (gamma < 1), endorectal coil hot spot, stronger bias, blurrier
    "SiteB": dict(fat_level=0.80, gamma=0.6, sigmoid_k=0.0, sigmoid_c=0.5, fluid_suppression=0.0,
                  scale=450.0, offset=0.0, bias=0.30, coil_gain=2.0, noise=0.035, blur_mm=1.6),
    # fat suppressed (fat dark: inverted fat/prostate contrast), steep sigmoid contrast
    "SiteC": dict(fat_level=0.15, gamma=0.8, sigmoid_k=0.0, sigmoid_c=0.5, fluid_suppression=0.0,
                  scale=2500.0, offset=0.0, bias=0.25, coil_gain=0.0, noise=0.03, blur_mm=0.9),
    # high gamma (dark mid-tones), fluid suppressed (dark bladder), offset, noisy, low-res
    "SiteD": dict(fat_level=0.90, gamma=1.8, sigmoid_k=0.0, sigmoid_c=0.5, fluid_suppression=0.85,
                  scale=1800.0, offset=120.0, bias=0.45, coil_gain=0.0, noise=0.05, blur_mm=1.8),
    # extra presets (not in the default demo): low-field-like and inverted-ish contrast
    "SiteE": dict(fat_level=0.5, gamma=0.8, sigmoid_k=0.0, sigmoid_c=0.5, fluid_suppression=0.0,
                  scale=300.0, offset=40.0, bias=0.55, coil_gain=0.0, noise=0.07, blur_mm=2.0),
    "SiteF": dict(fat_level=0.30, gamma=1.3, sigmoid_k=5.0, sigmoid_c=0.55, fluid_suppression=0.6,
                  scale=3000.0, offset=0.0, bias=0.2, coil_gain=1.0, noise=0.025, blur_mm=1.2),
}

_CURVE_KEYS = tuple(SITE_STYLES["SiteA"].keys())


# --------------------------------------------------------------------------------------------
# small numpy helpers
# --------------------------------------------------------------------------------------------
def _gauss_filter(vol: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian filter by FFT (periodic boundary); sigma in voxels per axis (0 = none)."""
    if all(s <= 0 for s in sigma_vox):
        return vol.astype(np.float32, copy=True)
    spec = np.fft.rfftn(vol)
    gain = np.ones(spec.shape, dtype=np.float64)
    for ax, (n, s) in enumerate(zip(vol.shape, sigma_vox)):
        if s <= 0:
            continue
        freq = np.fft.rfftfreq(n) if ax == vol.ndim - 1 else np.fft.fftfreq(n)
        g = np.exp(-2.0 * (np.pi * s * freq) ** 2)
        shp = [1] * vol.ndim
        shp[ax] = g.size
        gain = gain * g.reshape(shp)
    return np.fft.irfftn(spec * gain, s=vol.shape, axes=tuple(range(vol.ndim))).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with Gaussian correlation length ``sigma_mm``."""
    white = rng.standard_normal(shape)
    field = _gauss_filter(white, [sigma_mm / s for s in spacing])
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _soft(d: np.ndarray, radius_mm: float, width_mm: float) -> np.ndarray:
    """Anti-aliased inside-mask from a normalised distance ``d`` (1 on the boundary)."""
    return (0.5 * (1.0 - np.tanh((d - 1.0) * (radius_mm / width_mm)))).astype(np.float32)


class _Grid:
    def __init__(self, shape, fov_mm):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(f) / n for f, n in zip(fov_mm, self.shape))
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        self.x = axes[0].reshape(-1, 1, 1).astype(np.float32)
        self.y = axes[1].reshape(1, -1, 1).astype(np.float32)
        self.z = axes[2].reshape(1, 1, -1).astype(np.float32)
        self.edge = 0.45 * min(self.spacing[0], self.spacing[1])  # soft edge width, mm

    def affine(self) -> np.ndarray:
        aff = np.diag(list(self.spacing) + [1.0])
        aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing)]
        return aff

    def ellipse(self, cx, cy, ax, ay, angle=0.0, cz=0.0, az=None, tilt=0.0, power=2.0):
        """Normalised (super-)ellipsoid distance; ``az=None`` gives a cylinder along z."""
        dx, dy = self.x - cx, self.y - cy
        c, s = np.cos(angle), np.sin(angle)
        xr = c * dx + s * dy
        yr = -s * dx + c * dy
        if az is None:
            return (np.abs(xr / ax) ** power + np.abs(yr / ay) ** power) ** (1.0 / power)
        dz = self.z - cz
        ct, st = np.cos(tilt), np.sin(tilt)
        yr, zr = ct * yr + st * dz, -st * yr + ct * dz
        return (np.abs(xr / ax) ** power + np.abs(yr / ay) ** power
                + np.abs(zr / az) ** power) ** (1.0 / power)


def _paint(w, f, mask, w_val, f_val):
    """Alpha-composite a tissue with water signal ``w_val`` and fat fraction ``f_val``."""
    w += mask * (w_val - w)
    f += mask * (f_val - f)


# --------------------------------------------------------------------------------------------
# anatomy (site independent)
# --------------------------------------------------------------------------------------------
def sample_anatomy(rng: np.random.Generator, shape=DEFAULT_SHAPE, fov_mm=DEFAULT_FOV_MM) -> dict:
    """Draw one random pelvis.

    Returns a dict with ``water`` (latent T2 signal of the non-fat part, about 0..1),
    ``fat`` (fat fraction 0..1), ``label`` (uint8 whole-gland mask), ``affine`` and ``meta``
    (landmark positions in mm).  The result depends only on ``rng``, ``shape`` and ``fov_mm``.
    """
    g = _Grid(shape, fov_mm)
    sp = g.spacing
    full = g.shape
    u = rng.uniform
    e = g.edge
    w = np.zeros(full, np.float32)
    f = np.zeros(full, np.float32)
    zn = g.z / (fov_mm[2] / 2.0)  # -1 (inferior) .. 1 (superior)

    # ---- texture fields -------------------------------------------------------------------
    tex_fine = _smooth_noise(rng, full, 1.2, sp)
    tex_mid = _smooth_noise(rng, full, 2.5, sp)
    tex_coarse = _smooth_noise(rng, full, 6.0, sp)
    septa_field = _smooth_noise(rng, full, 4.0, sp)
    patchy = np.clip(_smooth_noise(rng, full, 12.0, sp) + 0.3, 0.0, 1.0)
    septa = np.exp(-(septa_field / 0.17) ** 2) * patchy  # sparse fibrous strands in fat

    # ---- body outline + fat --------------------------------------------------------------
    body_ax, body_ay = u(96, 112), u(76, 90)
    body_cy = u(-8, 0)
    grow = 1.0 + 0.04 * zn  # pelvis widens superiorly
    d_body = g.ellipse(0.0, body_cy, body_ax * grow, body_ay * grow, power=2.6)
    m_body = _soft(d_body, body_ay, e)
    _paint(w, f, m_body, 0.20 + 0.05 * tex_mid,
           np.clip(0.97 - 0.8 * septa + 0.03 * tex_coarse, 0, 1))
    subcut = u(10, 22)
    d_inner = g.ellipse(0.0, body_cy, body_ax * grow - subcut, body_ay * grow - subcut, power=2.4)
    m_inner = _soft(d_inner, body_ay - subcut, 2.0 * e)

    # prostate geometry first: other organs are placed relative to it
    p_cx, p_cy, p_cz = u(-3, 3), u(-14, -4), u(-5, 5)
    p_a, p_b, p_c = u(19, 25), u(14, 19), u(17, 23)
    p_rot, p_tilt = np.deg2rad(u(-12, 12)), np.deg2rad(u(-14, 6))

    muscle = 0.20 + 0.035 * tex_fine + 0.02 * tex_coarse
    muscle_fat = np.float32(0.04) + 0.12 * np.clip(septa - 0.6, 0, 1)

    def add_muscle(mask):
        _paint(w, f, mask * m_inner, muscle, muscle_fat)

    for side in (-1.0, 1.0):
        # gluteus maximus (posterolateral), obturator internus (lateral to the gland),
        # iliopsoas / pectineus (anterolateral)
        gx, gy = side * u(42, 56), body_cy - u(44, 58)
        ga, gb = u(36, 46), u(20, 28)
        add_muscle(_soft(g.ellipse(gx, gy, ga, gb, side * np.deg2rad(u(15, 35))), gb, e))
        ox, oy = side * u(40, 48), p_cy + u(-4, 6)
        oa, ob = u(8, 12), u(24, 32)
        add_muscle(_soft(g.ellipse(ox, oy, oa, ob, side * np.deg2rad(u(-10, 15))), oa, e))
        ix, iy = side * u(52, 64), p_cy + u(36, 46)
        ia, ib = u(14, 20), u(10, 14)
        add_muscle(_soft(g.ellipse(ix, iy, ia, ib, side * np.deg2rad(u(-30, 10))), ib, e))
        # rectus abdominis (anterior, thin)
        rx, ry = side * u(10, 16), body_cy + body_ay - subcut - u(3, 7)
        add_muscle(_soft(g.ellipse(rx, ry, u(9, 13), u(4, 6)), 4.0, e))

    # levator ani: thin dark sling behind/around the rectum and the apex of the gland
    la_cy = p_cy - p_b - u(8, 14)
    la_a, la_b = u(30, 38), u(22, 28)
    d_la = g.ellipse(0.0, la_cy, la_a, la_b)
    sling = _soft(d_la, la_b, e) * (1 - _soft(d_la / 0.86, la_b, e))
    sling = sling * (g.y < la_cy + 0.4 * la_b) * (1.0 - 0.6 * (zn > 0.5))
    add_muscle(sling)

    # ---- bladder (superior / anterior), bright urine -------------------------------------
    b_cx, b_cy = u(-5, 5), p_cy + u(14, 22)
    b_a, b_b, b_c = u(30, 40), u(22, 32), u(24, 34)
    b_cz = p_cz + p_c + b_c * u(0.35, 0.6)
    d_bl = g.ellipse(b_cx, b_cy, b_a, b_b, cz=b_cz, az=b_c)
    _paint(w, f, _soft(d_bl, b_b, e), 0.24 + 0.02 * tex_fine, 0.0)
    wall = u(2.5, 4.0)
    d_bl_in = g.ellipse(b_cx, b_cy, b_a - wall, b_b - wall, cz=b_cz, az=b_c - wall)
    _paint(w, f, _soft(d_bl_in, b_b - wall, e), 1.0 + 0.01 * tex_fine, 0.0)

    # ---- rectum (posterior), wall + gas / content -----------------------------------------
    r_cx = p_cx + u(-4, 4)
    r_cy = p_cy - p_b - u(9, 14) - 0.12 * g.z  # slight curvature along z
    r_a, r_b = u(14, 19), u(10, 14)
    d_r = g.ellipse(r_cx, r_cy, r_a, r_b)
    _paint(w, f, _soft(d_r, r_b, e), 0.30 + 0.03 * tex_fine, 0.0)
    r_wall = u(3.0, 4.5)
    d_rl = g.ellipse(r_cx, r_cy, r_a - r_wall, r_b - r_wall)
    content = u(0.0, 1.0)
    gas = 0.5 * (1.0 + np.tanh(3.0 * (tex_coarse - 1.6 * content + 0.6)))
    lumen = gas * 0.04 + (1.0 - gas) * (0.34 + 0.08 * tex_mid)
    _paint(w, f, _soft(d_rl, r_b - r_wall, e), lumen.astype(np.float32), 0.0)

    # ---- bones -----------------------------------------------------------------------------
    marrow_w = 0.30 + 0.05 * tex_mid
    marrow_f = np.clip(0.7 + 0.1 * tex_coarse, 0, 1)

    def add_bone(cx, cy, a, b, angle=0.0, cz=0.0, az=None, cortex=2.5):
        d_out = g.ellipse(cx, cy, a, b, angle, cz=cz, az=az)
        _paint(w, f, _soft(d_out, min(a, b), e), 0.03, 0.0)
        d_in = g.ellipse(cx, cy, a - cortex, b - cortex, angle, cz=cz,
                         az=None if az is None else az - cortex)
        _paint(w, f, _soft(d_in, min(a, b) - cortex, e), marrow_w, marrow_f)

    fem_z = p_cz + u(0, 14)
    for side in (-1.0, 1.0):
        fr = u(21, 25)
        add_bone(side * u(78, 88), p_cy + u(0, 10), fr, fr, cz=fem_z, az=u(34, 44), cortex=3.0)
        # pubic rami (anterior, inferior) and ischial tuberosities (posterolateral, inferior)
        add_bone(side * u(12, 17), p_cy + u(36, 44), u(12, 16), u(8, 11),
                 side * np.deg2rad(u(15, 35)), cz=p_cz - u(0, 10), az=u(22, 30))
        add_bone(side * u(50, 60), p_cy - u(24, 34), u(10, 14), u(12, 16),
                 cz=p_cz - u(10, 20), az=u(20, 28))

    # ---- seminal vesicles (bright, above the base, behind the bladder) -------------------
    for side in (-1.0, 1.0):
        sv_c = p_c * u(0.75, 0.95)
        d_sv = g.ellipse(p_cx + side * u(12, 18), p_cy - p_b * u(0.2, 0.5), u(13, 19), u(4, 6),
                         side * np.deg2rad(u(-30, -10)), cz=p_cz + sv_c + u(4, 9), az=u(6, 9))
        _paint(w, f, _soft(d_sv, 5.0, e), 0.78 + 0.12 * tex_fine, 0.0)

    # ---- prostate ----------------------------------------------------------------------------
    dx, dy, dz = g.x - p_cx, g.y - p_cy, g.z - p_cz
    c, s = np.cos(p_rot), np.sin(p_rot)
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    ct, st = np.cos(p_tilt), np.sin(p_tilt)
    yr, zr = ct * yr + st * dz, -st * yr + ct * dz
    zr_n = zr / p_c
    taper = 1.0 - 0.35 * np.clip(-zr_n, 0, 1)  # narrower apex (inferior)
    post = np.where(yr < 0, 1.25, 1.0)  # flatter posterior surface against the rectum
    d_p = np.sqrt((xr / (p_a * taper)) ** 2 + (yr * post / p_b) ** 2 + zr_n ** 2)
    deform = _smooth_noise(rng, full, 9.0, sp)
    d_p = d_p * (1.0 + u(0.06, 0.11) * deform)
    radius = min(p_a, p_b)
    m_gland = _soft(d_p, radius, e)
    pz = 0.70 + 0.05 * tex_fine + 0.04 * tex_mid
    _paint(w, f, m_gland, pz, 0.0)
    # central gland (transition + central zone), anterior/superior, nodular texture
    cg = u(0.55, 0.8)
    d_cg = np.sqrt(((xr - 0) / (p_a * cg * taper)) ** 2
                   + ((yr - 0.25 * p_b) / (p_b * (cg * 0.95))) ** 2
                   + ((zr - 0.2 * p_c) / (p_c * (cg + 0.1))) ** 2)
    d_cg = d_cg * (1.0 + 0.08 * _smooth_noise(rng, full, 7.0, sp))
    nodules = np.clip(tex_mid, -2, 2)
    cg_val = 0.38 + 0.09 * nodules + 0.03 * tex_fine
    _paint(w, f, _soft(d_cg, radius * cg, 1.5 * e) * m_gland, cg_val, 0.0)
    # thin dark capsule and a small urethra
    capsule = m_gland * (1.0 - _soft(d_p / 0.9, radius, e))
    _paint(w, f, 0.45 * capsule, 0.25, 0.0)
    d_u = g.ellipse(p_cx, p_cy + 0.15 * p_b, 2.2, 2.2)
    _paint(w, f, _soft(d_u, 2.2, e) * m_gland * (np.abs(zr_n) < 0.9), 0.55, 0.0)
    # neurovascular bundles: small bright dots posterolateral, along the gland
    for side in (-1.0, 1.0):
        d_nvb = g.ellipse(p_cx + side * p_a * 0.85, p_cy - p_b * 0.75, 3.0, 3.0)
        _paint(w, f, _soft(d_nvb, 3.0, e) * (np.abs(dz) < p_c), 0.65, 0.0)

    # ---- global texture, air outside the body ---------------------------------------------
    w *= 1.0 + 0.035 * tex_coarse
    w *= m_body
    f *= m_body
    np.clip(w, 0.0, 1.2, out=w)
    np.clip(f, 0.0, 1.0, out=f)

    # ---- label: whole gland, one contiguous run of slices ---------------------------------
    label = (d_p <= 1.0).astype(np.uint8)
    area = label.sum(axis=(0, 1))
    if area.any():
        present = area > 0
        k = int(np.argmax(area))
        lo, hi = k, k
        while lo > 0 and present[lo - 1]:
            lo -= 1
        while hi < len(present) - 1 and present[hi + 1]:
            hi += 1
        label[..., :lo] = 0
        label[..., hi + 1:] = 0

    meta = dict(prostate_center_mm=[float(p_cx), float(p_cy), float(p_cz)],
                prostate_semi_axes_mm=[float(p_a), float(p_b), float(p_c)],
                rectum_center_mm=[float(r_cx), float(p_cy - p_b - 11.5)])
    return dict(water=w, fat=f, label=label, affine=g.affine(), spacing=g.spacing, meta=meta)


# --------------------------------------------------------------------------------------------
# acquisition (site specific)
# --------------------------------------------------------------------------------------------
def _contrast_curve(latent: np.ndarray, style: Mapping[str, float]) -> np.ndarray:
    x = np.clip(latent, 0.0, None)
    sig = x ** float(style["gamma"])
    k = float(style["sigmoid_k"])
    if k > 0:
        c0 = float(style["sigmoid_c"])

        def sg(v):
            return 1.0 / (1.0 + np.exp(-k * (v - c0)))

        lo, hi = sg(0.0), sg(1.0)
        sig = (sg(sig) - lo) / (hi - lo)
    fs = float(style["fluid_suppression"])
    if fs > 0:
        t = np.clip((x - 0.88) / 0.09, 0.0, 1.0)
        sig = sig * (1.0 - fs * t * t * (3 - 2 * t))
    return sig.astype(np.float32)


def acquire(anatomy: Mapping[str, Any], style: Mapping[str, float],
            rng: np.random.Generator) -> np.ndarray:
    """Render ``anatomy`` (from :func:`sample_anatomy`) with one site's acquisition ``style``.

    Returns an int16 image in scanner-like units.  ``rng`` drives the per-case acquisition
    randomness only (jitter of the style, bias field, noise).
    """
    st = {**SITE_STYLES[DEMO_SOURCE_SITE], **dict(style)}
    water, fat = anatomy["water"], anatomy["fat"]
    shape = water.shape
    sp = anatomy["spacing"]
    u = rng.uniform
    # small per-case jitter of the site style (same scanner, slightly different settings)
    gamma = st["gamma"] * u(0.93, 1.07)
    fat_level = float(np.clip(st["fat_level"] * u(0.92, 1.08), 0.0, 1.2))
    latent = (1.0 - fat) * water + fat * fat_level
    sig = _contrast_curve(latent, {**st, "gamma": gamma})
    # point-spread function (in-plane sigma, half of it through-plane)
    blur = float(st["blur_mm"]) * u(0.9, 1.1)
    sig = _gauss_filter(sig, [blur / sp[0], blur / sp[1], 0.5 * blur / sp[2]])
    # smooth multiplicative bias field: random low-order polynomial in normalised coordinates
    g = _Grid(shape, [n * s for n, s in zip(shape, sp)])
    xn = g.x / (shape[0] * sp[0] / 2)
    yn = g.y / (shape[1] * sp[1] / 2)
    zn = g.z / (shape[2] * sp[2] / 2)
    terms = [xn, yn, zn, xn * yn, xn * xn - 0.33, yn * yn - 0.33, xn * zn, yn * zn]
    coef = rng.standard_normal(len(terms))
    coef /= np.linalg.norm(coef)
    log_bias = sum(cf * t for cf, t in zip(coef, terms)) * (float(st["bias"]) * 1.6)
    bias = np.exp(log_bias).astype(np.float32)
    if float(st["coil_gain"]) > 0:
        rc = anatomy["meta"]["rectum_center_mm"]
        dist = np.sqrt((g.x - rc[0]) ** 2 + (g.y - rc[1]) ** 2)
        bias = bias * (1.0 + float(st["coil_gain"]) * np.exp(-dist / 22.0)).astype(np.float32)
    scale = float(st["scale"]) * u(0.85, 1.15)
    img = scale * bias * sig + float(st["offset"])
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    sigma = float(st["noise"]) * float(st["scale"]) * u(0.85, 1.15)
    re = img + sigma * rng.standard_normal(shape).astype(np.float32)
    im = sigma * rng.standard_normal(shape).astype(np.float32)
    mag = np.sqrt(re * re + im * im)
    return np.clip(np.rint(mag), 0, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------
# dataset writer
# --------------------------------------------------------------------------------------------
def _resolve_sites(sites) -> dict[str, dict[str, float]]:
    if sites is None:
        sites = DEMO_SITES
    out: dict[str, dict[str, float]] = {}
    if isinstance(sites, Mapping):
        for name, style in sites.items():
            if isinstance(style, str):
                style = SITE_STYLES[style]
            elif style is None:
                style = SITE_STYLES.get(str(name), {})
            unknown = set(style) - set(_CURVE_KEYS)
            if unknown:
                raise ValueError(f"unknown style keys for site {name!r}: {sorted(unknown)}")
            out[str(name)] = {k: float(v) for k, v in
                              {**SITE_STYLES[DEMO_SOURCE_SITE], **dict(style)}.items()}
    else:
        if isinstance(sites, str):
            sites = [sites]
        for name in sites:
            if name not in SITE_STYLES:
                raise ValueError(f"unknown site preset {name!r}; presets: {sorted(SITE_STYLES)} "
                                 "(pass a dict name -> style to define new sites)")
            out[str(name)] = {k: float(v) for k, v in SITE_STYLES[name].items()}
    if not out:
        raise ValueError("at least one site is needed")
    for name in out:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid site name {name!r}")
    return out


def default_cases_per_site(sites: Sequence[str]) -> dict[str, int]:
    """Default case counts: 16 for the first (source) site, 6 for each other site."""
    return {s: (DEFAULT_SOURCE_CASES if i == 0 else DEFAULT_TARGET_CASES)
            for i, s in enumerate(sites)}


def _resolve_counts(cases_per_site, site_names: Sequence[str]) -> dict[str, int]:
    counts = default_cases_per_site(site_names)
    if cases_per_site is None:
        pass
    elif isinstance(cases_per_site, Mapping):
        unknown = set(cases_per_site) - set(site_names)
        if unknown:
            raise ValueError(f"cases_per_site names unknown sites: {sorted(unknown)}")
        counts.update({k: int(v) for k, v in cases_per_site.items()})
    else:
        counts = {s: int(cases_per_site) for s in site_names}
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"negative case count in {counts}")
    if sum(counts.values()) == 0:
        raise ValueError("cases_per_site gives no cases at all")
    return counts


def _params(seed, cases_per_site, shape, sites, fov_mm) -> dict:
    styles = _resolve_sites(sites)
    names = list(styles)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes >= 4, got {shape}")
    fov = [float(v) for v in fov_mm]
    if len(fov) != 3 or min(fov) <= 0:
        raise ValueError(f"fov_mm must be 3 positive lengths, got {fov_mm}")
    params = dict(seed=int(seed), shape=list(shape), fov_mm=fov, source_site=names[0],
                  cases_per_site=_resolve_counts(cases_per_site, names), sites=styles)
    return json.loads(json.dumps(params))  # normalised, comparable with the json file


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def generate_demo_prostate(root, seed: int = 0, cases_per_site=None, shape=DEFAULT_SHAPE,
                           sites=None, fov_mm=DEFAULT_FOV_MM) -> dict:
    """Write the synthetic multi-site prostate demo set into ``root``.

    Args:
        root: output folder (created; existing case files of the same names are overwritten).
        seed: master seed; the same seed and parameters give bit-identical files.
        cases_per_site: ``None`` (16 for the source site, 6 for each other), an int for every
            site, or a dict ``{site: n}`` (sites left out keep the default).
        shape: array shape (left-right, posterior-anterior, slices).
        sites: ``None`` (``DEMO_SITES``), a list of preset names from ``SITE_STYLES``, or a
            dict ``{name: style}`` where a style is a preset name or a dict of style keys that
            override the source style.  The first site is the source site.
        fov_mm: field of view in mm; the voxel spacing is ``fov_mm / shape``.

    Returns:
        summary dict: ``root``, ``sites``, ``source_site``, ``cases_per_site``, ``items``
        (list of {"image", "label", "site", "case"} with absolute paths), ``seconds``.
    """
    t0 = time.perf_counter()
    params = _params(seed, cases_per_site, shape, sites, fov_mm)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info_path = root / DEMO_INFO_FILE
    if info_path.exists():
        info_path.unlink()  # a partial rewrite must not look complete
    counts = params["cases_per_site"]
    logger.info("generating synthetic prostate demo in %s: %s, shape %s",
                root, counts, tuple(params["shape"]))
    rel_items = []
    case_no = 0
    for site_idx, (site, style) in enumerate(params["sites"].items()):
        site_dir = root / site
        site_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(counts[site]):
            case = f"Case{case_no:02d}"
            anat_rng = np.random.default_rng([params["seed"], case_no, 0])
            acq_rng = np.random.default_rng([params["seed"], case_no, 1, site_idx])
            anatomy = sample_anatomy(anat_rng, params["shape"], params["fov_mm"])
            image = acquire(anatomy, style, acq_rng)
            _save_nifti(site_dir / f"{case}.nii.gz", image, anatomy["affine"])
            _save_nifti(site_dir / f"{case}_segmentation.nii.gz", anatomy["label"],
                        anatomy["affine"])
            rel_items.append({"image": f"{site}/{case}.nii.gz",
                              "label": f"{site}/{case}_segmentation.nii.gz",
                              "site": site, "case": case})
            case_no += 1
        logger.info("  %s: %d cases%s", site, counts[site],
                    " (source)" if site == params["source_site"] else "")
    seconds = time.perf_counter() - t0
    info = {
        "generator": _GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "layout": "multisite",
        "labels": {"0": "background", "1": "prostate"},
        "spacing_mm": [f / n for f, n in zip(params["fov_mm"], params["shape"])],
        "items": rel_items,
    }
    write_demo_info(root, info, DEMO_INFO_FILE)
    logger.info("synthetic prostate demo: %d volumes in %.1f s", len(rel_items), seconds)
    return _summary(root, info, seconds)


def _summary(root: Path, info: Mapping, seconds: float | None = None) -> dict:
    params = info["params"]
    return demo_summary(root, info, seconds, sites=list(params["sites"]), source_site=params["source_site"],
                        cases_per_site=dict(params["cases_per_site"]))


def ensure_demo_prostate(root, seed: int = 0, **kwargs) -> Path:
    """Make sure ``root`` holds the demo set for these parameters; return ``root``.

    Generates only when ``demo_info.json`` is missing or records other parameters (or another
    generator version).  Generation goes to a temporary sibling folder that is renamed into
    place, so an interrupted run never leaves a half data set that looks complete.  A
    non-empty ``root`` that is not a demo set (no ``demo_info.json``) is never touched:
    ``FileExistsError`` is raised instead.  ``kwargs`` are those of
    :func:`generate_demo_prostate` (``cases_per_site``, ``shape``, ``sites``, ``fov_mm``).
    """
    unknown = set(kwargs) - {"cases_per_site", "shape", "sites", "fov_mm"}
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    params = _params(seed, kwargs.get("cases_per_site"), kwargs.get("shape", DEFAULT_SHAPE),
                     kwargs.get("sites"), kwargs.get("fov_mm", DEFAULT_FOV_MM))
    return install_demo(root, _GENERATOR, GENERATOR_VERSION, params,
                        lambda path: generate_demo_prostate(path, seed=seed, **kwargs), "synthetic prostate demo")

