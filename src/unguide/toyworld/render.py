"""Deterministic procedural renderer of the toy world.

Every image is a function of a :class:`Scene` (object, colour, background, size, position,
rotation, texture seed). Scenes are drawn at 4x resolution with PIL and box-downsampled, so
edges are anti-aliased the same way every time: same scene, same pixels, on any machine.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

OBJECTS = ("sun", "moon", "star", "heart", "house", "tree", "fish", "flower", "boat", "umbrella")
NO_OBJECT = "nothing"
CLASSES = OBJECTS + (NO_OBJECT,)  # classifier labels; index 10 = empty scene / unrecognisable

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)

# background name -> (top colour, bottom colour, speckle amplitude)
SCENES = {
    "sky": ((120, 185, 240), (200, 230, 250), 4),
    "grass": ((60, 140, 55), (85, 165, 70), 18),
    "night": ((10, 14, 40), (30, 35, 75), 3),
    "sand": ((215, 195, 140), (235, 215, 165), 14),
}
SCENE_NAMES = tuple(SCENES)

# Colours that would nearly vanish on a background are never drawn there, so captions stay true.
EXCLUDED = {"sky": ("white",), "grass": ("green",), "night": (), "sand": ("yellow", "white")}

IMAGE_SIZE = 32
_SS = 4  # supersampling factor
_CANVAS = IMAGE_SIZE * _SS


@dataclass(frozen=True)
class Scene:
    obj: Optional[str]  # None = empty scene
    colour: Optional[str]
    scene: str
    size: float = 0.6  # object radius as a fraction of half the image
    x: float = 0.0  # centre offset, fraction of half the image
    y: float = 0.0
    angle: float = 0.0  # degrees
    texture_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def allowed_colours(scene: str) -> tuple[str, ...]:
    return tuple(c for c in COLOUR_NAMES if c not in EXCLUDED[scene])


def sample_scene(rng: np.random.Generator, p_empty: float = 0.1, obj: Optional[str] = None,
                 colour: Optional[str] = None, scene: Optional[str] = None) -> Scene:
    """Draw random scene attributes; any of obj/colour/scene can be pinned."""
    if scene is None:
        scene = SCENE_NAMES[rng.integers(len(SCENE_NAMES))]
    empty = obj is None and rng.random() < p_empty
    if empty:
        return Scene(None, None, scene, texture_seed=int(rng.integers(2**31)))
    if obj is None:
        obj = OBJECTS[rng.integers(len(OBJECTS))]
    if colour is None:
        options = allowed_colours(scene)
        colour = options[rng.integers(len(options))]
    size = float(rng.uniform(0.45, 0.8))
    room = max(0.0, 0.92 - size)
    x, y = (float(v) for v in rng.uniform(-room, room, size=2))
    angle = float(rng.uniform(-15, 15))
    return Scene(obj, colour, scene, size, x, y, angle, int(rng.integers(2**31)))


def _background(scene: str, seed: int) -> Image.Image:
    top, bottom, speckle = SCENES[scene]
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, _CANVAS)[:, None, None]
    img = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    img = np.broadcast_to(img, (_CANVAS, _CANVAS, 3)).copy()
    low = rng.normal(0, speckle, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).repeat(_SS, 0).repeat(_SS, 1)
    img += low
    if scene == "night":  # a few faint pixel-sized lights
        for _ in range(int(rng.integers(3, 7))):
            i, j = rng.integers(0, IMAGE_SIZE, size=2)
            img[i * _SS:(i + 1) * _SS, j * _SS:(j + 1) * _SS] = 150
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _sun_rays() -> list[tuple]:
    """The sun's eight rays: (tip, base corner, base corner) each, in units of the radius."""
    rays = []
    for k in range(8):
        a = k * math.pi / 4
        rays.append(((math.cos(a), math.sin(a)), (0.5 * math.cos(a + 0.28), 0.5 * math.sin(a + 0.28)),
                     (0.5 * math.cos(a - 0.28), 0.5 * math.sin(a - 0.28))))
    return rays


def _star_points() -> list[tuple]:
    """A five-pointed star's ten corners, outer (1.0) and inner (0.42) by turns, from the top."""
    return [((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]


def _shape_parts(obj: str, r: float, colour: tuple[int, int, int]):
    """Return [(draw_fn, rgb)] for the object centred at the canvas centre with radius r."""
    c = _CANVAS / 2
    dark = tuple(int(v * 0.45) for v in colour)
    brown = (110, 70, 30)

    def P(u, v):
        return (c + u * r, c + v * r)

    def circle(u, v, rad):
        return lambda d, fill: d.ellipse([c + (u - rad) * r, c + (v - rad) * r, c + (u + rad) * r, c + (v + rad) * r], fill=fill)

    def poly(*pts):
        return lambda d, fill: d.polygon([P(u, v) for u, v in pts], fill=fill)

    def rect(u0, v0, u1, v1):
        return lambda d, fill: d.rectangle([*P(u0, v0), *P(u1, v1)], fill=fill)

    if obj == "sun":
        return [(circle(0, 0, 0.55), colour)] + [(poly(*ray), colour) for ray in _sun_rays()]
    if obj == "moon":
        return [(circle(0, 0, 0.9), colour), (circle(0.45, -0.2, 0.75), None)]  # None = cut out
    if obj == "star":
        return [(poly(*_star_points()), colour)]
    if obj == "heart":
        return [(circle(-0.45, -0.3, 0.5), colour), (circle(0.45, -0.3, 0.5), colour),
                (poly((-0.93, -0.12), (0.93, -0.12), (0, 0.95)), colour)]
    if obj == "house":
        return [(rect(-0.7, -0.1, 0.7, 0.9), colour), (poly((-0.95, -0.05), (0.95, -0.05), (0, -0.9)), colour),
                (rect(-0.16, 0.4, 0.16, 0.9), dark)]
    if obj == "tree":
        return [(rect(-0.15, 0.1, 0.15, 0.95), brown), (circle(0, -0.3, 0.65), colour)]
    if obj == "fish":
        return [(lambda d, fill: d.ellipse([*P(-0.85, -0.42), *P(0.45, 0.42)], fill=fill), colour),
                (poly((0.3, 0), (0.95, -0.5), (0.95, 0.5)), colour), (circle(-0.5, -0.08, 0.09), dark)]
    if obj == "flower":
        parts = [(rect(-0.06, 0.1, 0.06, 0.95), (40, 120, 40))]
        for k in range(6):
            a = k * math.pi / 3
            parts.append((circle(0.36 * math.cos(a), -0.3 + 0.36 * math.sin(a), 0.26), colour))
        centre = (250, 250, 250) if colour[2] < 100 and colour[0] > 200 else (250, 210, 40)
        parts.append((circle(0, -0.3, 0.17), centre))
        return parts
    if obj == "boat":
        return [(poly((-0.95, 0.35), (0.95, 0.35), (0.6, 0.8), (-0.6, 0.8)), colour),
                (rect(-0.04, -0.9, 0.04, 0.35), brown), (poly((0.1, -0.85), (0.1, 0.25), (0.75, 0.25)), colour),
                (poly((-0.1, -0.6), (-0.1, 0.25), (-0.6, 0.25)), colour)]
    if obj == "umbrella":
        def canopy(d, fill):
            d.pieslice([*P(-0.95, -0.85), *P(0.95, 1.05)], 180, 360, fill=fill)
        return [(canopy, colour), (rect(-0.05, 0.05, 0.05, 0.75), brown),
                (lambda d, fill: d.arc([*P(-0.3, 0.55), *P(0.05, 0.9)], 0, 180, fill=fill, width=max(1, int(0.1 * r))), brown)]
    raise ValueError(f"unknown object {obj!r}")


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a (32, 32, 3) uint8 array."""
    bg = _background(scene.scene, scene.texture_seed)
    if scene.obj is not None:
        r = scene.size * _CANVAS / 2
        rgb = COLOURS[scene.colour]
        layer = Image.new("RGB", (_CANVAS, _CANVAS), (0, 0, 0))
        mask = Image.new("L", (_CANVAS, _CANVAS), 0)
        dl, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
        for fn, fill in _shape_parts(scene.obj, r, rgb):
            if fill is None:
                fn(dm, 0)
                continue
            fn(dl, fill)
            fn(dm, 255)
        outline = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(5)), mask)
        dark = tuple(int(v * 0.35) for v in rgb)
        layer.paste(Image.new("RGB", layer.size, dark), (0, 0), outline)
        mask = ImageChops.lighter(mask, outline)
        layer = layer.rotate(scene.angle, resample=Image.BILINEAR)
        mask = mask.rotate(scene.angle, resample=Image.BILINEAR)
        offset = (int(round(scene.x * _CANVAS / 2)), int(round(scene.y * _CANVAS / 2)))
        bg.paste(layer, offset, mask)
    return np.asarray(bg.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8)


def render_batch(seed: int, n: int, p_empty: float = 0.1, **pins) -> tuple[np.ndarray, list[Scene]]:
    """Render n random scenes from one seed: returns (n, 32, 32, 3) uint8 and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, p_empty=p_empty, **pins) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes
