"""Built-in synthetic multi-domain colour fundus demo data (optic disc / cup crops).

Every image is a crop around the optic disc of a random eye drawn from ONE anatomy sampler
shared by all domains: an orange-red retina with smooth choroidal texture, an optionally
pigmented peripapillary ring, a bright yellowish optic disc (a slightly irregular, mostly
vertical ellipse of random size near the centre), a paler cup inside it (cup-to-disc ratio
0.3..0.7, offset from the disc centre) and dark-red branching vessels that leave the cup
(superior and inferior arcades plus smaller nasal/temporal branches, thicker near the disc).

Each domain ("camera / hospital") then *acquires* the eye with its own style: colour cast
(channel gains), saturation, brightness, contrast and gamma, Gaussian blur, vignetting
(radial darkening around a jittered centre) and sensor noise.  Domains differ only in
acquisition, never in anatomy statistics: the setting of single-source domain
generalisation (the usual fundus benchmark trains on Drishti-GS and tests on RIM-ONE and the
two REFUGE cameras).

Files are written in the layout of the usual 5-domain fundus benchmark::

    <root>/Domain<k>/{train,test}/ROIs/image/<name>.png   RGB uint8 image
    <root>/Domain<k>/{train,test}/ROIs/mask/<name>.png    grey uint8 mask:
                                                          255 background, 128 disc rim, 0 cup
    <root>/demo_info.json                                 generator version, parameters, items

Image names (``fundus_NNNN``) are unique over the whole demo set, so a name identifies one
synthetic eye.  Only numpy and pillow are needed; filtering is done with FFTs.
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
    "DEMO_FUNDUS_SOURCE_DOMAIN",
    "DEMO_FUNDUS_DOMAINS",
    "FUNDUS_DOMAIN_STYLES",
    "FUNDUS_GENERATOR_VERSION",
    "MASK_BACKGROUND",
    "MASK_RIM",
    "MASK_CUP",
    "default_fundus_counts",
    "generate_demo_fundus",
    "ensure_demo_fundus",
    "sample_fundus_anatomy",
    "acquire_fundus",
]

logger = logging.getLogger("msf_monai.data")

FUNDUS_GENERATOR_VERSION = "1.0"
#: the generator's name in demo_info.json (its module before 0.6.0; kept, so existing demo folders stay current)
_GENERATOR = "msf_monai.data.synthetic_fundus"
DEMO_FUNDUS_SOURCE_DOMAIN = "Domain1"
DEMO_FUNDUS_DOMAINS: tuple[str, ...] = ("Domain1", "Domain2", "Domain3", "Domain4")
DEFAULT_SIZE = 128
DEFAULT_SOURCE_COUNTS = {"train": 40, "test": 10}
DEFAULT_TARGET_COUNTS = {"train": 10, "test": 10}
SPLITS: tuple[str, ...] = ("train", "test")

#: grey values of the benchmark masks
MASK_BACKGROUND, MASK_RIM, MASK_CUP = 255, 128, 0

#: Acquisition style of each preset domain.  Keys (all resolution independent):
#:   gain_r/g/b     colour cast: per-channel gains on the linear reflectance
#:   saturation     1: unchanged, < 1: towards grey, > 1: more saturated
#:   brightness     global gain (exposure)
#:   contrast       stretch around the image's mean grey level (after brightness)
#:   gamma          display curve ``out = in ** gamma`` (> 1: darker mid-tones)
#:   blur           Gaussian PSF sigma as a fraction of the image size
#:   vignette       radial darkening: gain ``1 - vignette * (r / r_corner) ** 2``
#:   noise          Gaussian sensor noise sigma (image in 0..1), half of it shared by channels
FUNDUS_DOMAIN_STYLES: dict[str, dict[str, float]] = {
    # source: warm orange Drishti-like photographs, sharp, mild vignetting, little noise
    "Domain1": dict(gain_r=1.00, gain_g=1.00, gain_b=1.00, saturation=1.00, brightness=1.00,
                    contrast=1.00, gamma=1.00, blur=0.002, vignette=0.15, noise=0.008),
    # dark, red-heavy camera (RIM-ONE-like): darker mid-tones, strong vignetting, noisier
    "Domain2": dict(gain_r=1.00, gain_g=0.70, gain_b=0.80, saturation=1.10, brightness=0.80,
                    contrast=1.10, gamma=1.45, blur=0.004, vignette=0.45, noise=0.030),
    # washed-out, yellow-green cast, low contrast, blurry (REFUGE-train-like)
    "Domain3": dict(gain_r=0.88, gain_g=1.25, gain_b=1.60, saturation=0.85, brightness=1.10,
                    contrast=0.65, gamma=0.80, blur=0.011, vignette=0.10, noise=0.015),
    # cold, desaturated, high contrast, brownish-grey, strong noise (REFUGE-val-like)
    "Domain4": dict(gain_r=0.80, gain_g=1.10, gain_b=2.20, saturation=0.55, brightness=0.90,
                    contrast=1.35, gamma=1.10, blur=0.003, vignette=0.30, noise=0.045),
    # extra presets (not in the default demo): very dark and very bright, blurry cameras
    "Domain5": dict(gain_r=1.10, gain_g=0.85, gain_b=0.60, saturation=1.00, brightness=0.55,
                    contrast=0.90, gamma=1.20, blur=0.006, vignette=0.55, noise=0.040),
    "Domain6": dict(gain_r=0.95, gain_g=1.10, gain_b=1.20, saturation=0.70, brightness=1.35,
                    contrast=0.80, gamma=0.70, blur=0.015, vignette=0.05, noise=0.010),
}

_STYLE_KEYS = tuple(FUNDUS_DOMAIN_STYLES["Domain1"].keys())


# --------------------------------------------------------------------------------------------
# small numpy helpers
# --------------------------------------------------------------------------------------------
def _gauss2d(img: np.ndarray, sigma: float, periodic: bool = False) -> np.ndarray:
    """Gaussian filter of the two leading axes by FFT; ``sigma`` in pixels.

    Non-periodic filtering reflects the borders (``3 sigma`` of padding) first.
    """
    img = np.asarray(img, dtype=np.float32)
    if sigma <= 0.05:
        return img.copy()
    pad = 0 if periodic else int(np.ceil(3.0 * sigma))
    if pad:
        widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (img.ndim - 2)
        work = np.pad(img, widths, mode="reflect" if min(img.shape[:2]) > pad else "edge")
    else:
        work = img
    h, w = work.shape[:2]
    fy = np.fft.fftfreq(h).reshape(-1, 1)
    fx = np.fft.rfftfreq(w).reshape(1, -1)
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy * fy + fx * fx))
    if work.ndim > 2:
        gain = gain.reshape(gain.shape + (1,) * (work.ndim - 2))
    out = np.fft.irfft2(np.fft.rfft2(work, axes=(0, 1)) * gain, s=(h, w), axes=(0, 1))
    if pad:
        out = out[pad:-pad, pad:-pad]
    return out.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field, correlation length ``sigma`` pixels."""
    field = _gauss2d(rng.standard_normal((size, size)), sigma, periodic=True)
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _soft(d: np.ndarray, radius: float, width: float) -> np.ndarray:
    """Anti-aliased inside-mask from a normalised distance ``d`` (1 on the boundary)."""
    return (0.5 * (1.0 - np.tanh((d - 1.0) * (radius / max(width, 1e-3))))).astype(np.float32)


class _Blob:
    """A rotated ellipse with a smoothly wobbling (irregular) boundary."""

    def __init__(self, rng: np.random.Generator, cy, cx, ry, rx, angle, wobble, orders=(2, 3, 4, 5)):
        self.cy, self.cx, self.ry, self.rx, self.angle = cy, cx, ry, rx, angle
        self.harmonics = [(k, wobble * rng.uniform(0.3, 1.0) / k ** 0.5, rng.uniform(0, 2 * np.pi))
                          for k in orders]

    def distance(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Normalised distance: < 1 inside, 1 on the (irregular) boundary."""
        dy, dx = yy - self.cy, xx - self.cx
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = (c * dx + s * dy) / self.rx
        v = (-s * dx + c * dy) / self.ry
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        radius = np.ones_like(rho)
        for k, amp, phase in self.harmonics:
            radius += amp * np.cos(k * theta + phase)
        return (rho / radius).astype(np.float32)

    @property
    def mean_radius(self) -> float:
        return float(np.sqrt(self.rx * self.ry))


# --------------------------------------------------------------------------------------------
# vessels
# --------------------------------------------------------------------------------------------
def _grow_vessel(rng, segments, y, x, heading, width, size, depth, curl, arcade_turn, origin):
    """Random-walk one vessel from (y, x), appending (y0, x0, y1, x1, width) segments and
    spawning thinner branches; the width tapers with the distance from ``origin``."""
    step = 0.018 * size
    n_steps = int(rng.uniform(0.7, 1.1) * size / step) if depth == 0 else \
        int(rng.uniform(0.25, 0.6) * size / step)
    turn = 0.0
    next_branch = rng.uniform(0.15, 0.35) * size
    travelled = 0.0
    for _ in range(n_steps):
        turn = 0.6 * turn + rng.normal(0.0, curl)
        heading += turn + arcade_turn
        y1 = y + step * np.sin(heading)
        x1 = x + step * np.cos(heading)
        dist = np.hypot(y1 - origin[0], x1 - origin[1])
        w = width * (0.55 + 0.45 * np.exp(-dist / (0.35 * size)))
        segments.append((y, x, y1, x1, max(w, 0.004 * size)))
        y, x = y1, x1
        travelled += step
        if not (-0.1 * size < y < 1.1 * size and -0.1 * size < x < 1.1 * size):
            break
        if depth < 2 and travelled > next_branch:
            next_branch = travelled + rng.uniform(0.25, 0.5) * size * (1 + depth)
            side = rng.choice([-1.0, 1.0])
            _grow_vessel(rng, segments, y, x, heading + side * rng.uniform(0.45, 1.0),
                         w * rng.uniform(0.55, 0.75), size, depth + 1, curl * 1.2,
                         0.0, origin)
            width *= 0.85  # the parent gets thinner after a branch


def _vessel_map(rng: np.random.Generator, size: int, cup_cy: float, cup_cx: float,
                disc_r: float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha 0..1, darkness 0..1) maps of the vessel tree, anti-aliased by supersampling."""
    from PIL import Image, ImageDraw

    segments: list[tuple] = []
    darkness: list[float] = []
    origin = (cup_cy, cup_cx)
    w0 = rng.uniform(0.024, 0.032) * size
    # superior and inferior arcades: first go up/down, then bend temporally (to -x or +x)
    temporal = rng.choice([-1.0, 1.0])
    trees = [(-np.pi / 2, 1.0), (np.pi / 2, 1.0)]
    trees += [(rng.uniform(-0.4, 0.4) + (0.0 if temporal < 0 else np.pi), rng.uniform(0.4, 0.6))
              for _ in range(int(rng.integers(1, 3)))]
    trees += [(rng.uniform(-0.5, 0.5) + (np.pi if temporal < 0 else 0.0), rng.uniform(0.35, 0.55))
              for _ in range(int(rng.integers(0, 2)))]
    for heading, rel_w in trees:
        for vein in (True, False) if rel_w == 1.0 else (rng.random() < 0.5,):
            start = len(segments)
            h = heading + rng.normal(0.0, 0.25) + (0.12 if vein else -0.12)
            y = cup_cy + rng.normal(0.0, 0.1 * disc_r)
            x = cup_cx + rng.normal(0.0, 0.1 * disc_r)
            # the arcades bend towards the temporal side, away from the vertical
            bend = 0.0
            if rel_w == 1.0:
                bend = -temporal * np.sign(np.sin(heading)) * rng.uniform(0.010, 0.022)
            _grow_vessel(rng, segments, y, x, h, w0 * rel_w * (1.0 if vein else 0.8), size, 0,
                         0.03, bend, origin)
            dark = rng.uniform(0.75, 0.95) if vein else rng.uniform(0.45, 0.65)
            darkness.extend([dark] * (len(segments) - start))
    ss = int(max(1, min(4, 1024 // max(size, 1))))
    big = size * ss
    alpha = Image.new("L", (big, big), 0)
    dark_img = Image.new("L", (big, big), 0)
    da, dd = ImageDraw.Draw(alpha), ImageDraw.Draw(dark_img)
    for (y0, x0, y1, x1, w), dk in zip(segments, darkness):
        wpx = max(1, int(round(w * ss)))
        pts = [(x0 * ss, y0 * ss), (x1 * ss, y1 * ss)]
        r = wpx / 2.0
        val = int(round(255 * dk))
        for draw, fill in ((da, 255), (dd, val)):
            draw.line(pts, fill=fill, width=wpx)
            draw.ellipse([x1 * ss - r, y1 * ss - r, x1 * ss + r, y1 * ss + r], fill=fill)
    alpha = np.asarray(alpha.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    dark_map = np.asarray(dark_img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    dark_map = np.where(alpha > 1e-3, dark_map / np.maximum(alpha, 1e-3), 0.0)
    return alpha, np.clip(dark_map, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# anatomy (domain independent)
# --------------------------------------------------------------------------------------------
def sample_fundus_anatomy(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> dict:
    """Draw one random optic-disc crop.

    Returns a dict with ``rgb`` (float32 [size, size, 3] linear reflectance, about 0..1),
    ``disc`` and ``cup`` (bool [size, size] masks, cup inside disc), ``mask`` (uint8 grey
    benchmark mask: 255 background, 128 rim, 0 cup) and ``meta`` (centres, radii, cup-to-disc
    ratio).  The result depends only on ``rng`` and ``size``.
    """
    n = int(size)
    u = rng.uniform
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    edge = max(0.6, 0.006 * n)  # soft edge width in pixels

    # ---- geometry ------------------------------------------------------------------------
    disc_r = u(0.15, 0.22) * n
    disc_cy = n / 2.0 + float(np.clip(rng.normal(0.0, 0.04 * n), -0.08 * n, 0.08 * n))
    disc_cx = n / 2.0 + float(np.clip(rng.normal(0.0, 0.04 * n), -0.08 * n, 0.08 * n))
    aspect = u(1.0, 1.15)  # discs are slightly taller than wide
    disc = _Blob(rng, disc_cy, disc_cx, disc_r * np.sqrt(aspect), disc_r / np.sqrt(aspect),
                 np.deg2rad(u(-15, 15)), wobble=0.035)
    cdr = u(0.3, 0.7)
    max_off = (1.0 - cdr) * 0.45 * disc_r
    off_ang = u(0, 2 * np.pi)
    off = u(0.0, 1.0) * max_off
    cup_cy, cup_cx = disc_cy + off * np.sin(off_ang), disc_cx + off * np.cos(off_ang)
    cup_aspect = aspect * u(0.95, 1.15)
    cup_r = cdr * disc.mean_radius
    cup = _Blob(rng, cup_cy, cup_cx, cup_r * np.sqrt(cup_aspect), cup_r / np.sqrt(cup_aspect),
                disc.angle + np.deg2rad(u(-10, 10)), wobble=0.05)
    d_disc = disc.distance(yy, xx)
    d_cup = cup.distance(yy, xx)
    disc_mask = d_disc <= 1.0
    cup_mask = (d_cup <= 1.0) & disc_mask
    a_disc = _soft(d_disc, disc.mean_radius, edge)
    a_cup = _soft(d_cup, cup.mean_radius, u(2.0, 3.5) * edge) * a_disc

    # ---- textures --------------------------------------------------------------------------
    tex_coarse = _smooth_noise(rng, n, 0.12 * n)
    tex_mid = _smooth_noise(rng, n, 0.035 * n)
    tex_fine = _smooth_noise(rng, n, max(0.7, 0.008 * n))

    # ---- retina background (orange-red, pigmentation varies per eye) ----------------------
    pigment = u(0.8, 1.1)
    base = np.array([0.62, 0.25, 0.055]) * pigment * np.array([1.0, u(0.85, 1.15), u(0.7, 1.3)])
    shade = 1.0 + 0.10 * tex_coarse + 0.05 * tex_mid + 0.02 * tex_fine
    # slightly brighter close to the disc, darker far away (fovea side / periphery)
    rr = np.hypot(yy - disc_cy, xx - disc_cx) / n
    shade = shade * (1.0 + 0.10 * np.exp(-((rr / 0.35) ** 2)) - 0.08 * rr)
    rgb = base[None, None, :] * shade[..., None]
    # optional dark peripapillary pigment ring just outside the disc
    ring_strength = u(0.0, 0.35) if rng.random() < 0.6 else 0.0
    if ring_strength > 0:
        ring_w = u(0.08, 0.18)
        ring = np.exp(-(((d_disc - 1.0 - ring_w) / (0.6 * ring_w)) ** 2))
        ring = ring * np.clip(0.6 + 0.5 * _smooth_noise(rng, n, 0.06 * n), 0, 1)
        rgb = rgb * (1.0 - ring_strength * ring[..., None] * np.array([0.8, 0.6, 0.3]))

    # ---- optic disc (yellow-orange rim) and cup (pale) -------------------------------------
    rim = np.array([0.90, u(0.48, 0.60), u(0.08, 0.18)])
    rim_shade = 1.0 + 0.05 * tex_mid + 0.03 * tex_fine
    # the rim is brighter towards the cup
    rim_grad = 1.0 + 0.10 * np.clip(1.0 - d_disc, 0, 1)
    rim_rgb = rim[None, None, :] * (rim_shade * rim_grad)[..., None]
    cup_col = np.array([1.0, u(0.80, 0.90), u(0.45, 0.62)])
    lamina = 1.0 - 0.06 * np.clip(tex_fine, 0, None)  # dotted lamina cribrosa
    cup_rgb = cup_col[None, None, :] * lamina[..., None]
    rgb = rgb + a_disc[..., None] * (rim_rgb - rgb)
    rgb = rgb + a_cup[..., None] * (cup_rgb - rgb)

    # ---- vessels -------------------------------------------------------------------------
    v_alpha, v_dark = _vessel_map(rng, n, cup_cy, cup_cx, disc.mean_radius)
    # vessel colour: deep red; veins (dark ~0.9) darker than arteries (~0.55)
    vessel_rgb = np.array([0.68, 0.12, 0.05])[None, None, :] * (1.1 - 0.5 * v_dark[..., None])
    # vessels on the bright disc are a bit more contrasted: colour fixed, alpha from map
    rgb = rgb + (0.88 * v_alpha)[..., None] * (vessel_rgb - rgb)

    rgb = np.clip(rgb, 0.0, 1.2).astype(np.float32)
    mask = np.full((n, n), MASK_BACKGROUND, np.uint8)
    mask[disc_mask] = MASK_RIM
    mask[cup_mask] = MASK_CUP
    meta = dict(disc_center=[float(disc_cy), float(disc_cx)], disc_radius=float(disc.mean_radius),
                cup_center=[float(cup_cy), float(cup_cx)], cup_radius=float(cup.mean_radius),
                cup_to_disc=float(cdr))
    return dict(rgb=rgb, disc=disc_mask, cup=cup_mask, mask=mask, meta=meta)


# --------------------------------------------------------------------------------------------
# acquisition (domain specific)
# --------------------------------------------------------------------------------------------
def acquire_fundus(anatomy: Mapping[str, Any], style: Mapping[str, float],
                   rng: np.random.Generator) -> np.ndarray:
    """Photograph ``anatomy`` (from :func:`sample_fundus_anatomy`) with one domain's ``style``.

    Returns an RGB uint8 image [H, W, 3].  ``rng`` drives the per-image acquisition randomness
    only (small jitter of the style, vignetting centre, noise).
    """
    st = {**FUNDUS_DOMAIN_STYLES[DEMO_FUNDUS_SOURCE_DOMAIN], **dict(style)}
    img = np.asarray(anatomy["rgb"], dtype=np.float32)
    n = img.shape[0]
    u = rng.uniform

    def jit(key, lo=0.94, hi=1.06):
        return float(st[key]) * u(lo, hi)

    gains = np.array([jit("gain_r"), jit("gain_g"), jit("gain_b")], np.float32)
    img = img * gains[None, None, :]
    sat = jit("saturation")
    grey = img.mean(axis=2, keepdims=True)
    img = grey + sat * (img - grey)
    img = img * jit("brightness")
    mean = float(img.mean())
    img = mean + jit("contrast") * (img - mean)
    img = np.clip(img, 0.0, None) ** jit("gamma")
    sigma = float(st["blur"]) * n * u(0.85, 1.15)
    img = _gauss2d(img, sigma)
    vig = float(st["vignette"]) * u(0.85, 1.15)
    if vig > 0:
        yy, xx = np.mgrid[0:n, 0:img.shape[1]].astype(np.float32)
        cy = (n - 1) / 2.0 + rng.normal(0.0, 0.05 * n)
        cx = (img.shape[1] - 1) / 2.0 + rng.normal(0.0, 0.05 * n)
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * n) ** 2 / 2.0
        img = img * np.clip(1.0 - vig * r2, 0.05, 1.0)[..., None]
    noise = float(st["noise"]) * u(0.85, 1.15)
    if noise > 0:
        shared = rng.standard_normal(img.shape[:2]).astype(np.float32)[..., None]
        own = rng.standard_normal(img.shape).astype(np.float32)
        img = img + noise * (0.5 * shared + 0.866 * own)
    return np.clip(np.rint(np.clip(img, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# dataset writer
# --------------------------------------------------------------------------------------------
def _resolve_domains(domains) -> dict[str, dict[str, float]]:
    if domains is None:
        domains = DEMO_FUNDUS_DOMAINS
    out: dict[str, dict[str, float]] = {}
    src = FUNDUS_DOMAIN_STYLES[DEMO_FUNDUS_SOURCE_DOMAIN]
    if isinstance(domains, Mapping):
        for name, style in domains.items():
            if isinstance(style, str):
                if style not in FUNDUS_DOMAIN_STYLES:
                    raise ValueError(f"unknown domain preset {style!r}; presets: "
                                     f"{sorted(FUNDUS_DOMAIN_STYLES)}")
                style = FUNDUS_DOMAIN_STYLES[style]
            elif style is None:
                style = FUNDUS_DOMAIN_STYLES.get(str(name), {})
            unknown = set(style) - set(_STYLE_KEYS)
            if unknown:
                raise ValueError(f"unknown style keys for domain {name!r}: {sorted(unknown)}")
            out[str(name)] = {k: float(v) for k, v in {**src, **dict(style)}.items()}
    else:
        if isinstance(domains, str):
            domains = [domains]
        for name in domains:
            if name not in FUNDUS_DOMAIN_STYLES:
                raise ValueError(f"unknown domain preset {name!r}; presets: "
                                 f"{sorted(FUNDUS_DOMAIN_STYLES)} (pass a dict name -> style to "
                                 "define new domains)")
            out[str(name)] = {k: float(v) for k, v in FUNDUS_DOMAIN_STYLES[name].items()}
    if not out:
        raise ValueError("at least one domain is needed")
    for name in out:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid domain name {name!r}")
    return out


def default_fundus_counts(domains: Sequence[str]) -> dict[str, dict[str, int]]:
    """Default image counts: 40 train + 10 test for the first (source) domain, 10 + 10 for
    every other domain."""
    return {d: dict(DEFAULT_SOURCE_COUNTS if i == 0 else DEFAULT_TARGET_COUNTS)
            for i, d in enumerate(domains)}


def _one_count(value, what: str) -> dict[str, int]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(SPLITS)
        if unknown:
            raise ValueError(f"{what}: unknown splits {sorted(unknown)} (use 'train', 'test')")
        out = {s: int(value.get(s, 0)) for s in SPLITS}
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what}: expected (n_train, n_test), got {value!r}")
        out = {"train": int(value[0]), "test": int(value[1])}
    else:
        out = {"train": int(value), "test": int(value)}
    if min(out.values()) < 0:
        raise ValueError(f"{what}: negative image count in {out}")
    return out


def _resolve_counts(images_per_domain, names: Sequence[str]) -> dict[str, dict[str, int]]:
    counts = default_fundus_counts(names)
    if images_per_domain is None:
        pass
    elif isinstance(images_per_domain, Mapping) and not set(images_per_domain) <= set(SPLITS):
        unknown = set(images_per_domain) - set(names)
        if unknown:
            raise ValueError(f"images_per_domain names unknown domains: {sorted(unknown)}")
        for k, v in images_per_domain.items():
            counts[k] = _one_count(v, f"images_per_domain[{k!r}]")
    else:
        one = _one_count(images_per_domain, "images_per_domain")
        counts = {d: dict(one) for d in names}
    if sum(sum(c.values()) for c in counts.values()) == 0:
        raise ValueError("images_per_domain gives no images at all")
    return counts


def _params(seed, images_per_domain, size, domains) -> dict:
    styles = _resolve_domains(domains)
    names = list(styles)
    size = int(size)
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    params = dict(seed=int(seed), size=size, source_domain=names[0],
                  images_per_domain=_resolve_counts(images_per_domain, names), domains=styles)
    return json.loads(json.dumps(params))  # normalised, comparable with the json file


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(str(path), format="PNG", compress_level=1)


def generate_demo_fundus(root, seed: int = 0, images_per_domain=None, size: int = DEFAULT_SIZE,
                         domains=None) -> dict:
    """Write the synthetic multi-domain fundus demo set into ``root``.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        seed: master seed; the same seed and parameters give bit-identical files.
        images_per_domain: ``None`` (40 train + 10 test for the source domain, 10 + 10 for
            the others); an int ``n`` (``n`` train and ``n`` test images in every domain); a
            pair ``(n_train, n_test)`` or dict ``{"train": n, "test": m}`` for every domain;
            or a dict ``{domain: count}`` with any of these forms per domain (domains left out
            keep the default).
        size: image width and height in pixels.
        domains: ``None`` (``DEMO_FUNDUS_DOMAINS``), a list of preset names from
            ``FUNDUS_DOMAIN_STYLES``, or a dict ``{name: style}`` where a style is a preset
            name or a dict of style keys overriding the source style.  The first domain is
            the source domain.

    Returns:
        summary dict: ``root``, ``domains``, ``source_domain``, ``images_per_domain``,
        ``items`` (list of {"image", "label", "site", "case", "split", "label_format"} with
        absolute paths), ``version``, ``seconds``.
    """
    t0 = time.perf_counter()
    params = _params(seed, images_per_domain, size, domains)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info_path = root / DEMO_INFO_FILE
    if info_path.exists():
        info_path.unlink()  # a partial rewrite must not look complete
    counts = params["images_per_domain"]
    logger.info("generating synthetic fundus demo in %s: %s, %d px", root, counts, params["size"])
    rel_items = []
    number = 0
    for dom_idx, (dom, style) in enumerate(params["domains"].items()):
        for split in SPLITS:
            img_dir = root / dom / split / "ROIs" / "image"
            mask_dir = root / dom / split / "ROIs" / "mask"
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(counts[dom][split]):
                name = f"fundus_{number:04d}"
                anat_rng = np.random.default_rng([params["seed"], number, 0])
                acq_rng = np.random.default_rng([params["seed"], number, 1, dom_idx])
                anatomy = sample_fundus_anatomy(anat_rng, params["size"])
                image = acquire_fundus(anatomy, style, acq_rng)
                _save_png(img_dir / f"{name}.png", image)
                _save_png(mask_dir / f"{name}.png", anatomy["mask"])
                rel_items.append({"image": f"{dom}/{split}/ROIs/image/{name}.png",
                                  "label": f"{dom}/{split}/ROIs/mask/{name}.png",
                                  "site": dom, "case": name, "split": split,
                                  "label_format": "grey"})
                number += 1
        logger.info("  %s: %d train + %d test images%s", dom, counts[dom]["train"],
                    counts[dom]["test"], " (source)" if dom == params["source_domain"] else "")
    seconds = time.perf_counter() - t0
    info = {
        "generator": _GENERATOR,
        "version": FUNDUS_GENERATOR_VERSION,
        "params": params,
        "layout": "domains",
        "labels": {str(MASK_BACKGROUND): "background", str(MASK_RIM): "optic disc rim",
                   str(MASK_CUP): "optic cup"},
        "items": rel_items,
    }
    write_demo_info(root, info, DEMO_INFO_FILE)
    logger.info("synthetic fundus demo: %d images in %.1f s", len(rel_items), seconds)
    return _summary(root, info, seconds)


def _summary(root: Path, info: Mapping, seconds: float | None = None) -> dict:
    params = info["params"]
    return demo_summary(root, info, seconds, domains=list(params["domains"]), source_domain=params["source_domain"],
                        images_per_domain={k: dict(v) for k, v in params["images_per_domain"].items()})


def ensure_demo_fundus(root, seed: int = 0, **kwargs) -> Path:
    """Make sure ``root`` holds the fundus demo set for these parameters; return ``root``.

    Generates only when ``demo_info.json`` is missing or records other parameters (or another
    generator / version), or files are missing.  Generation goes to a temporary sibling
    folder that is renamed into place, so an interrupted run never leaves a half data set
    that looks complete.  A non-empty ``root`` that is not a demo set (no ``demo_info.json``)
    is never touched: ``FileExistsError`` is raised instead.  ``kwargs`` are those of
    :func:`generate_demo_fundus` (``images_per_domain``, ``size``, ``domains``).
    """
    unknown = set(kwargs) - {"images_per_domain", "size", "domains"}
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    params = _params(seed, kwargs.get("images_per_domain"), kwargs.get("size", DEFAULT_SIZE),
                     kwargs.get("domains"))
    return install_demo(root, _GENERATOR, FUNDUS_GENERATOR_VERSION, params,
                        lambda path: generate_demo_fundus(path, seed=seed, **kwargs), "synthetic fundus demo")
