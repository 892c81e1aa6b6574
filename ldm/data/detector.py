"""A deterministic detector for the procedural scene world, used to score generated images.

``detect(image)`` finds the coloured shapes of ``ldm.data.world`` in an RGB image of any size:

1. **Colour.** Each pixel is given a palette colour or left as background. Chromatic colours need
   strong saturation and are told apart by hue; white must be bright and grey-free, black dark (or,
   for thin blurred strokes, well lighter or darker than the local background). The world's
   backgrounds are muted and mid-toned, so they fall through every test.
2. **Regions.** Pixels of one colour are grouped into 8-connected components. A region larger than
   any object is cut at its waist (blur joins neighbours of one colour); pieces of one object are
   joined (blur breaks thin rings); a thin rim around an object of another colour joins that object
   (blur turns the edge of a red object on beige orange).
3. **Coverage.** Around each region the background is filled in from the pixels outside every
   object, and each pixel's coverage is its colour's share on the line from that background to the
   palette colour, less the image's noise, and scaled so a region's interior counts as covered
   (generated colours fall short of the palette). Coverage keeps what blur moves about: total area,
   centroid and angular balance.
4. **Shape.** From the coverage map: an empty centre or mass far from the centroid makes a ring; a
   third angular harmonic a triangle, a fourth a square, a fifth (or, when blur has eaten the
   points, a spread wider than a disc's) a star; what is left is a circle. A region whose total
   coverage is under ``MIN_AREA`` of the image is dropped.

Binary-mask features (fill ratio, solidity against a convex hull, enclosed holes) separate the
shapes of clean renders perfectly but fail once an image is blurred, as generated images are: after
a 2x bilinear down-up resample and noise, they got 36% of scenes right, the coverage features 96-98%.

A ``Detection``'s box is the square the shape is drawn in, as ``SceneObject.box`` (wider than a
triangle's or a star's pixels), estimated from the coverage area and centroid, so requested and
detected boxes compare directly; ``extent`` is the tight box of the pixels at least half covered.
Thresholds were calibrated on rendered scenes (seeds 1000-1299) at 64 and 128 pixels, clean and
degraded, and checked on seeds 5000-5299 and at 256 pixels; ``tests/test_detector.py`` uses others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm.data.world import COLOURS, POSITIONS

Box = tuple[float, float, float, float]

# Colour classification, on 0-255 channels. The world's backgrounds have chroma (max - min) under
# 50, every channel at least 96 and at least one channel at most 176 (see world.MUTED and friends).
CHROMA_MIN = 70.0  # a chromatic object pixel has at least this chroma ...
SATURATION_MIN = 0.45  # ... and this saturation (chroma / max)
WHITE_MIN = 200.0  # white: every channel at least this ...
BLACK_MAX = 85.0  # black: every channel at most this ...
NEUTRAL_CHROMA_MAX = 45.0  # ... and, for both, a chroma at most this
# Blurred thin white or black strokes miss those levels but stand out from their surroundings: a
# neutral pixel is also white (black) when it lies at least RELATIVE_MIN of the way from the local
# background level to the palette's white (black), and is lighter than WHITE_FLOOR (darker than
# BLACK_CEILING). The background level is a median over blocks of 1 / BACKGROUND_BLOCKS of the side.
RELATIVE_MIN = 0.45
WHITE_FLOOR = 160.0
BLACK_CEILING = 120.0
BACKGROUND_BLOCKS = 8

# Regions. Lengths are fractions of the image side; an object spans 0.17 (small) or 0.29 (large).
MIN_AREA = 0.0025  # smallest coverage kept, as a fraction of the image area (10 px at 64 x 64)
SPLIT_EXTENT = 0.36  # a region longer than this is cut in two ...
SPLIT_MIN = 0.12  # ... leaving at least this much on each side ...
NECK_RATIO = 0.75  # ... where it is at most this thick, against the thickest part of either side
FRAGMENT_GAP = 0.03  # regions of a colour whose boxes are this close join when together they fit in
GROUP_EXTENT = 0.33  # this (one large object; two small neighbours span 0.37 or more), or when one is
FRAGMENT_RATIO = 0.3  # under this fraction of the other's area and together they fit in SPLIT_EXTENT
RIM_WIDTH = 0.03  # a region under FRAGMENT_RATIO of a region of another colour, with RIM_SHARE of its
RIM_SHARE = 0.6  # pixels within RIM_WIDTH of it, is that region's blurred rim and joins it

# Coverage.
MARGIN = 0.04  # coverage is measured this far around a region
NOISE_FLOOR = 2.0  # coverage under this many standard deviations of the image's noise is noise
INSET = 0.03  # coverage is scaled so that its median over the region's pixels this far inside is 1 ...
CORE_MIN = 0.6  # ... by at most 1 / CORE_MIN, when that interior holds INTERIOR_SHARE of the region
INTERIOR_SHARE = 0.2  # (filled shapes of some size; not rings, not small triangles or stars)
SOLID_SHARE = 0.5  # a detection has at least this share of MIN_AREA in pixels half covered or more

# Shape classification, on ShapeFeatures.
RING_CENTRE_MAX = 0.7  # a ring's centre is empty (at most 0.5 seen; filled shapes 0.85 and up) ...
RING_SPREAD_MIN = 0.3  # ... or its mass lies far out (ring 0.34; disc 0.16, star 0.20, triangle 0.19)
TRIANGLE_HARMONIC_MIN = 0.14  # triangles 0.14-0.6, other shapes under 0.14
SQUARE_HARMONIC_MIN = 0.1  # squares 0.11-0.32, circles up to 0.16 when blurred ...
SQUARE_FILL_MIN = 0.88  # ... so a square must fill its rows and columns too: squares 0.91-1, circles 0.73-0.92
STAR_HARMONIC_MIN = 0.09  # stars 0.25-0.6 when sharp, down to 0.03 when small and blurred; circles up to 0.08
STAR_SPREAD_MIN = 0.19  # a star's spread is 0.20; a disc's 0.159, a square's 0.167
BLUR_GAIN = 1.35  # corrects the edge-width estimate of the blur (it reads low on clipped coverage)

# Each shape as world.draw_object draws it in a square of half side r: area / r^2, and how far its
# centroid lies below the square's centre, over r.
_SHAPE_AREA = {
    "circle": math.pi,
    "ring": math.pi * (1 - 0.6**2),  # outline width 0.4 r
    "square": 1.76**2,  # inset 0.12 r on each side
    "triangle": 3 * math.sqrt(3) / 4,  # equilateral, inscribed in the circle of radius r
    "star": 5 * 0.45 * math.sin(math.pi / 5),  # ten points at radii r and 0.45 r
}
_SHAPE_CENTROID_DROP = {"triangle": 0.12}

_NAMES = list(COLOURS)  # class k (1-based) is _NAMES[k - 1]; 0 is background
_CHROMATIC = [name for name in _NAMES if name not in ("white", "black")]
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    box: Box  # (x0, y0, x1, y1) in [0, 1]: the square the shape is drawn in, as SceneObject.box
    position: str  # the 3x3 grid word of the box centre, as in world.POSITIONS
    area_fraction: float  # the covered area over the image's
    extent: Box  # the tight box of the pixels at least half covered, in [0, 1]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def detect(image) -> list[Detection]:
    """The world's objects found in ``image`` (an RGB uint8 array (H, W, 3) or a PIL image), top to
    bottom and left to right."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    side = max(height, width)
    classes = classify_pixels(rgb)
    regions = [r for c in range(1, len(_NAMES) + 1) for r in _regions_of(classes == c, c)]
    regions = [part for r in regions for part in _split_merged(r, SPLIT_EXTENT * side, SPLIT_MIN * side)]
    regions = _merge_fragments(regions, FRAGMENT_GAP * side, GROUP_EXTENT * side, SPLIT_EXTENT * side)
    regions = _absorb_rims(regions, reach=max(1, round(RIM_WIDTH * side)))
    regions = [r for r in regions if r.area >= MIN_AREA * height * width / 4]  # MIN_AREA applies to coverage

    owner = np.zeros((height, width), dtype=np.int64)
    for label, region in enumerate(regions, start=1):
        owner[region.ys, region.xs] = label
    margin = max(2, math.ceil(MARGIN * side))
    background = ~_dilate(classes > 0, margin)
    noise = _noise_level(rgb, background)
    scan = _Scan(rgb, owner, background, margin, inset=max(1, round(INSET * side)), noise=noise)
    described = (_describe(scan, region, label) for label, region in enumerate(regions, start=1))
    detections = [d for d in described if d is not None]
    return sorted(detections, key=lambda d: (d.centre[1], d.centre[0]))


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"image must be an RGB uint8 array of shape (H, W, 3) or a PIL image; got dtype {array.dtype} "
            f"and shape {array.shape}"
        )
    return array


# --- colour ----------------------------------------------------------------------------------


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) class map of an RGB uint8 image: 0 for background, else 1 + the index of the pixel's
    colour in COLOURS."""
    pixels = rgb.astype(np.float32)
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    chroma = high - low
    classes = np.zeros(rgb.shape[:2], dtype=np.int64)

    distance = np.abs(_hue_degrees(pixels)[..., None] - _CHROMATIC_HUES)
    nearest = np.argmin(np.minimum(distance, 360 - distance), axis=-1)
    chromatic_class = _CHROMATIC_CLASSES[nearest]
    chromatic = (chroma >= CHROMA_MIN) & (chroma >= SATURATION_MIN * high)
    classes[chromatic] = chromatic_class[chromatic]

    neutral = chroma <= NEUTRAL_CHROMA_MAX
    white_class, black_class = _NAMES.index("white") + 1, _NAMES.index("black") + 1
    classes[neutral & (low >= WHITE_MIN)] = white_class
    classes[neutral & (high <= BLACK_MAX)] = black_class

    white, black = (float(_PALETTE[c - 1].mean()) for c in (white_class, black_class))
    luminance = pixels.mean(axis=2)
    level = _background_level(luminance, _dilate(classes > 0, 1))
    lighter = (luminance - level) >= RELATIVE_MIN * np.maximum(white - level, 1.0)
    darker = (level - luminance) >= RELATIVE_MIN * np.maximum(level - black, 1.0)
    faint = neutral & (classes == 0)
    classes[faint & lighter & (low >= WHITE_FLOOR)] = white_class
    classes[faint & darker & (high <= BLACK_CEILING)] = black_class
    return classes


def _background_level(values: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """A smooth (H, W) estimate of ``values`` away from the ``exclude`` pixels: the median of each
    block, blocks with too few free pixels filled from their neighbours, interpolated between block
    centres."""
    height, width = values.shape
    step = max(4, math.ceil(max(height, width) / BACKGROUND_BLOCKS))
    rows, columns = math.ceil(height / step), math.ceil(width / step)
    free = np.full((rows * step, columns * step), np.nan, dtype=np.float32)
    free[:height, :width] = np.where(exclude, np.nan, values)
    blocks = free.reshape(rows, step, columns, step).transpose(0, 2, 1, 3).reshape(rows, columns, -1)
    known = (~np.isnan(blocks)).sum(axis=-1) * 4 >= step * step
    if not known.any():
        return np.full(values.shape, float(np.median(values)), dtype=np.float32)
    grid = np.zeros((rows, columns, 1), dtype=np.float32)
    grid[known, 0] = np.nanmedian(blocks[known], axis=-1)
    grid = _fill_background(grid, known)[..., 0]
    return _between_centres(_between_centres(grid, step, height), step, width, axis=1)


def _between_centres(grid: np.ndarray, step: int, size: int, axis: int = 0) -> np.ndarray:
    """Linear interpolation along ``axis`` from values at block centres to ``size`` pixel centres."""
    position = (np.arange(size) + 0.5) / step - 0.5  # in block units
    first = np.clip(np.floor(position).astype(np.int64), 0, grid.shape[axis] - 1)
    second = np.minimum(first + 1, grid.shape[axis] - 1)
    t = np.clip(position - first, 0.0, 1.0)
    shape = (-1, 1) if axis == 0 else (1, -1)
    return np.take(grid, first, axis) * (1 - t).reshape(shape) + np.take(grid, second, axis) * t.reshape(shape)


def _hue_degrees(pixels: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 360) of (..., 3) float RGB pixels."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    high = pixels.max(axis=-1)
    chroma = np.maximum(high - pixels.min(axis=-1), 1e-6)
    sector = np.where(
        high == r, ((g - b) / chroma) % 6, np.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4)
    )
    return np.asarray(sector * 60.0) % 360


_CHROMATIC_CLASSES = np.array([_NAMES.index(name) + 1 for name in _CHROMATIC])
_CHROMATIC_HUES = _hue_degrees(_PALETTE[_CHROMATIC_CLASSES - 1])


# --- regions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Pixels of one colour taken for one object (a connected component, or pieces joined): their
    rows and columns in the image."""

    colour: int  # class index, 1-based into COLOURS
    ys: np.ndarray
    xs: np.ndarray

    @property
    def area(self) -> int:
        return len(self.ys)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), end exclusive."""
        return int(self.xs.min()), int(self.ys.min()), int(self.xs.max()) + 1, int(self.ys.max()) + 1


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected True regions of a 2-D mask: (labels, count), labels 1..count, 0 outside.

    Works on horizontal runs: each run is joined, with a union-find, to the runs of the row above
    that overlap it (or touch it diagonally, for 8-connectivity).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    labels = np.zeros(mask.shape, dtype=np.int64)
    if not mask.any():
        return labels, 0
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)  # row-major order, so the n-th start pairs with the n-th stop
    stops = np.nonzero(edges == -1)[1]
    row_begin = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    rows, starts, stops = rows.tolist(), starts.tolist(), stops.tolist()
    reach = 1 if connectivity == 8 else 0
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for run, row in enumerate(rows):
        for above in range(row_begin[row - 1], row_begin[row]) if row > 0 else ():
            if starts[above] < stops[run] + reach and starts[run] < stops[above] + reach:
                parent[find(run)] = find(above)
    roots: dict[int, int] = {}
    for run, row in enumerate(rows):
        labels[row, starts[run] : stops[run]] = roots.setdefault(find(run), len(roots) + 1)
    return labels, len(roots)


def _regions_of(mask: np.ndarray, colour: int) -> list[Region]:
    labels, count = label_components(mask)
    if count == 0:
        return []
    ys, xs = np.nonzero(labels)
    owners = labels[ys, xs]
    order = np.argsort(owners, kind="stable")
    ys, xs, owners = ys[order], xs[order], owners[order]
    splits = np.searchsorted(owners, np.arange(2, count + 1))
    return [Region(colour, y, x) for y, x in zip(np.split(ys, splits), np.split(xs, splits))]


def _merge_fragments(regions: list[Region], gap: float, extent: float, limit: float) -> list[Region]:
    """Join the pieces of an object: a region joins the largest region of its colour nearby with
    which it fits in one object's ``extent``, or, if that region dwarfs it, within ``limit``."""
    kept: list[Region] = []
    for region in sorted(regions, key=lambda r: r.area, reverse=True):
        for i, big in enumerate(kept):
            if big.colour != region.colour or _box_gap(big.bounds, region.bounds) > gap:
                continue
            (x0, y0, x1, y1), (u0, v0, u1, v1) = big.bounds, region.bounds
            together = max(max(x1, u1) - min(x0, u0), max(y1, v1) - min(y0, v0))
            if together <= extent or (region.area < FRAGMENT_RATIO * big.area and together <= limit):
                kept[i] = Region(big.colour, np.concatenate([big.ys, region.ys]), np.concatenate([big.xs, region.xs]))
                break
        else:
            kept.append(region)
    return kept


def _absorb_rims(regions: list[Region], reach: int) -> list[Region]:
    """Fold each region that is a rim of a larger region of another colour into it."""
    kept = sorted(regions, key=lambda r: r.area, reverse=True)
    for index in range(len(kept) - 1, 0, -1):  # smallest first
        rim = kept[index]
        host = next((i for i, big in enumerate(kept[:index]) if _is_rim(rim, big, reach)), None)
        if host is not None:
            big = kept[host]
            kept[host] = Region(big.colour, np.concatenate([big.ys, rim.ys]), np.concatenate([big.xs, rim.xs]))
            del kept[index]
    return kept


def _is_rim(rim: Region, big: Region, reach: int) -> bool:
    if big.colour == rim.colour or rim.area >= FRAGMENT_RATIO * big.area:
        return False
    if _box_gap(big.bounds, rim.bounds) > reach:
        return False
    x0, y0 = min(big.bounds[0], rim.bounds[0]), min(big.bounds[1], rim.bounds[1])
    x1, y1 = max(big.bounds[2], rim.bounds[2]), max(big.bounds[3], rim.bounds[3])
    near = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    near[big.ys - y0, big.xs - x0] = True
    near = _dilate(near, reach)
    return near[rim.ys - y0, rim.xs - x0].mean() >= RIM_SHARE


def _box_gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Chebyshev gap in pixels between two boxes; 0 when they touch or overlap."""
    return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3], 0)


def _split_merged(region: Region, max_extent: float, min_extent: float) -> list[Region]:
    """Objects of one colour that blur has joined: a region wider (or taller) than ``max_extent`` is
    cut across its thinnest column (row) that leaves an object's size on each side, if that is a
    waist, recursively."""
    x0, y0, x1, y1 = region.bounds
    along, start, length = (region.xs, x0, x1 - x0) if x1 - x0 >= y1 - y0 else (region.ys, y0, y1 - y0)
    if length <= max_extent:
        return [region]
    first, last = math.ceil(min_extent), min(math.floor(max_extent), length - math.ceil(min_extent))
    if first > last:  # too small for two objects: leave it whole
        return [region]
    thickness = np.bincount(along - start, minlength=length)
    cut = first + int(np.argmin(thickness[first : last + 1]))
    if thickness[cut] > NECK_RATIO * min(thickness[:cut].max(), thickness[cut:].max()):
        return [region]  # no waist to cut at: one large thing, not two objects
    cut += start
    return [
        part
        for side in (along < cut, along >= cut)
        for part in _split_merged(Region(region.colour, region.ys[side], region.xs[side]), max_extent, min_extent)
    ]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a mask by ``steps`` pixels in all eight directions."""
    mask = mask.copy()
    for _ in range(steps):
        mask[1:] |= mask[:-1].copy()
        mask[:-1] |= mask[1:].copy()
        mask[:, 1:] |= mask[:, :-1].copy()
        mask[:, :-1] |= mask[:, 1:].copy()
    return mask


# --- coverage --------------------------------------------------------------------------------


def _fill_background(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(H, W, C) float copy of ``image`` with the unknown pixels filled inward, ring by ring, from
    their known 4-neighbours (at least one pixel must be known)."""
    image = image.astype(np.float32)
    known = known.copy()
    while not known.all():
        weight = known.astype(np.float32)
        value = image * weight[..., None]
        count, total = np.zeros_like(weight), np.zeros_like(value)
        for near, far in ((np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:])):
            count[near] += weight[far]
            total[near] += value[far]
            count[:, near] += weight[:, far]
            total[:, near] += value[:, far]
        reached = ~known & (count > 0)
        image[reached] = total[reached] / count[reached, None]
        known |= reached
    return image


def _noise_level(rgb: np.ndarray, background: np.ndarray) -> float:
    """Robust standard deviation of pixel noise, from differences of horizontal background neighbours."""
    pairs = background[:, 1:] & background[:, :-1]
    if pairs.sum() < 16:
        return 0.0
    differences = (rgb[:, 1:].astype(np.float32) - rgb[:, :-1])[pairs]  # (n, 3)
    return float(np.median(1.4826 * np.median(np.abs(differences), axis=0)) / math.sqrt(2))


@dataclass(frozen=True)
class _Scan:
    """What measuring coverage needs from the whole image."""

    rgb: np.ndarray
    owner: np.ndarray  # (H, W): the 1-based label of the region each pixel belongs to, 0 for none
    background_known: np.ndarray  # (H, W): far enough from every object to show the background
    margin: int  # pixels around a region over which its coverage is measured
    inset: int  # pixels from a region's edge to its interior
    noise: float  # standard deviation of the background's pixel noise, 0-255


def _coverage(scan: _Scan, region: Region, label: int) -> tuple[np.ndarray, int, int]:
    """(alpha, x0, y0): the region's colour coverage in [0, 1] over its box grown by the margin
    (zero on other regions' pixels), and where that window starts in the image."""
    height, width = scan.owner.shape
    bx0, by0, bx1, by1 = region.bounds
    x0, y0 = max(bx0 - scan.margin - 1, 0), max(by0 - scan.margin - 1, 0)
    x1, y1 = min(bx1 + scan.margin + 1, width), min(by1 + scan.margin + 1, height)
    window, owner = scan.rgb[y0:y1, x0:x1], scan.owner[y0:y1, x0:x1]
    known = scan.background_known[y0:y1, x0:x1]
    if known.any():
        background = _fill_background(window, known)
    else:  # the window lies inside objects: use the background seen anywhere, or a mid grey
        elsewhere = scan.background_known
        seen = np.median(scan.rgb[elsewhere], axis=0) if elsewhere.any() else np.full(3, 128.0)
        background = np.broadcast_to(seen.astype(np.float32), window.shape)
    direction = _PALETTE[region.colour - 1] - background  # (h, w, 3)
    alpha = ((window - background) * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1.0)
    # Lift coverage above the noise, which clipping at 0 would otherwise add up around the region.
    floor = np.minimum(NOISE_FLOOR * scan.noise / np.sqrt(np.maximum((direction**2).sum(-1), 1.0)), 0.5)
    alpha = (alpha - floor) / (1.0 - floor)
    # A generator's colours may fall short of the palette: take the region's interior as fully
    # covered (blur leaves the interior alone; a region too thin to have one is left as it is).
    own = owner == label
    interior = own & ~_dilate(~own, scan.inset)
    if interior.sum() >= INTERIOR_SHARE * own.sum():
        alpha = alpha / min(max(float(np.median(alpha[interior])), CORE_MIN), 1.0)
    mine = _dilate(own, scan.margin) & ((owner == 0) | own)
    return np.clip(alpha, 0.0, 1.0) * mine, x0, y0


# --- shape -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeFeatures:
    """Blur-tolerant geometry of a coverage map, in pixels of the image it came from."""

    area: float  # total coverage
    cx: float  # centroid, pixel units of the window
    cy: float
    centre_fill: float  # mean coverage near the centroid: about 0 for a ring, 1 otherwise
    fill: float  # area over (longest column x longest row): square 1, circle 0.79, triangle and star 0.5
    spread: float  # second moment over area^2, blur removed: disc 0.159, square 0.167, star 0.20, ring 0.34
    harmonics: tuple[float, float, float]  # 3-, 4- and 5-fold angular symmetry in the world's poses, in [-1, 1]
    blur: float  # estimated standard deviation of the blur, pixels


def shape_features(alpha: np.ndarray) -> ShapeFeatures:
    """Features of a coverage map with some coverage."""
    area = float(alpha.sum())
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    dx, dy = xs - cx, ys - cy
    radius2 = dx * dx + dy * dy
    moment = alpha * radius2
    angle = np.arctan2(dy, dx)
    total = max(float(moment.sum()), 1e-12)  # zero only for a single pixel
    harmonic = {k: complex((moment * np.exp(1j * k * angle)).sum() / total) for k in (3, 4, 5)}
    # Projected on the world's poses (y points down): a triangle's apex up at -90 degrees, a square's
    # corners on the diagonals, a star's first point up.
    harmonics = (harmonic[3].imag, -harmonic[4].real, -harmonic[5].imag)
    near = radius2 <= max(0.3 * math.sqrt(area / math.pi), 1.0) ** 2
    blur = _blur_sigma(alpha)
    return ShapeFeatures(
        area=area,
        cx=cx,
        cy=cy,
        centre_fill=float(alpha[near].mean()),
        fill=area / float(alpha.sum(axis=0).max() * alpha.sum(axis=1).max()),
        spread=float(moment.sum()) / area**2 - 2 * blur**2 / area,
        harmonics=harmonics,
        blur=blur,
    )


def _blur_sigma(alpha: np.ndarray) -> float:
    """Edge width as a Gaussian sigma: the ramp of a blurred edge holds sigma / sqrt(pi) of
    alpha (1 - alpha) per unit of perimeter, and the total gradient is the perimeter."""
    if min(alpha.shape) < 2:
        return 0.0
    ramp = np.clip((alpha - 0.1) / 0.8, 0.0, 1.0)  # keep background noise out
    gy, gx = np.gradient(ramp)
    perimeter = float(np.hypot(gx, gy).sum())
    if perimeter == 0.0:
        return 0.0
    return BLUR_GAIN * math.sqrt(math.pi) * float((ramp * (1 - ramp)).sum()) / perimeter


def classify_shape(features: ShapeFeatures) -> str:
    """The world's shape that the features fit; rings first, circles last."""
    triangle, square, star = features.harmonics
    if features.centre_fill < RING_CENTRE_MAX or features.spread >= RING_SPREAD_MIN:
        return "ring"
    if triangle >= TRIANGLE_HARMONIC_MIN and triangle > square:
        return "triangle"
    if square >= SQUARE_HARMONIC_MIN and features.fill >= SQUARE_FILL_MIN and square >= star:
        return "square"
    if star >= STAR_HARMONIC_MIN or features.spread >= STAR_SPREAD_MIN:
        return "star"
    return "circle"


# --- detections ------------------------------------------------------------------------------


def _describe(scan: _Scan, region: Region, label: int) -> Detection | None:
    height, width = scan.owner.shape
    alpha, x0, y0 = _coverage(scan, region, label)
    if (alpha >= 0.5).sum() < SOLID_SHARE * MIN_AREA * height * width:  # faint: noise, not an object
        return None
    if alpha.sum() < MIN_AREA * height * width:
        return None
    features = shape_features(alpha)
    shape = classify_shape(features)
    r = math.sqrt(features.area / _SHAPE_AREA[shape])
    cx = x0 + features.cx
    cy = y0 + features.cy - _SHAPE_CENTROID_DROP.get(shape, 0.0) * r
    rows, columns = np.nonzero(alpha >= 0.5)
    if len(rows):
        extent = (x0 + int(columns.min()), y0 + int(rows.min()), x0 + int(columns.max()) + 1, y0 + int(rows.max()) + 1)
    else:  # a faint object: nothing half covered
        extent = region.bounds
    return Detection(
        colour=_NAMES[region.colour - 1],
        shape=shape,
        box=((cx - r) / width, (cy - r) / height, (cx + r) / width, (cy + r) / height),
        position=position_word(cx / width, cy / height),
        area_fraction=features.area / (width * height),
        extent=(extent[0] / width, extent[1] / height, extent[2] / width, extent[3] / height),
    )


def position_word(x: float, y: float) -> str:
    """The world's 3x3 grid word for a normalised point."""
    cell = (min(max(int(x * 3), 0), 2), min(max(int(y * 3), 0), 2))
    return next(word for word, c in POSITIONS.items() if c == cell)
