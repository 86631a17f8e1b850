"""Synthetic scenes for the demo model: 1-3 coloured shapes on a plain background, with bilingual Q&A.

Everything is a pure function of a seed, so a dataset, a test and the model card's evaluation can be
regenerated bit for bit. Every scene is built so each question asked about it has exactly one right
answer: shapes in one scene have distinct kinds, distinct colours and distinct positions, and a shape
never crosses into another's region. Background colours are never shape colours, and no training
question asks about them (that is what the few-shot demo teaches).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

Lang = Literal["en", "zh"]
LANGS: tuple[Lang, ...] = ("en", "zh")
IMAGE_SIZE = 224

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("left", "right", "top", "bottom", "center")  # also the order shapes are described in
BACKGROUNDS = ("white", "black", "gray", "pink")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "purple": (140, 50, 180), "orange": (250, 140, 20),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "pink": (255, 185, 200),
}  # fmt: skip
ANCHORS: dict[str, tuple[int, int]] = {
    "left": (40, 112), "right": (184, 112), "top": (112, 40), "bottom": (112, 184), "center": (112, 112),
}  # fmt: skip
# A shape's size (circle radius) and its offset from the anchor, in pixels: as large as the layout allows
# without two shapes touching or a shape leaving the image.
MIN_SIZE, MAX_SIZE, JITTER = 20, 28, 4

ZH = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形",
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
    "white": "白色", "black": "黑色", "gray": "灰色", "pink": "粉色",
    "left": "左边", "right": "右边", "top": "上边", "bottom": "下边", "center": "中间",
}  # fmt: skip
EN_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
            "center": "in the center"}
EN_NUMBER = {1: "one", 2: "two", 3: "three"}
ZH_NUMBER = {1: "一", 2: "两", 3: "三"}
# Other words a question may use for the same thing ("free variation of the nouns").
ZH_SHAPE_ALIASES = {"circle": ("圆形", "圆"), "square": ("正方形", "方块"), "triangle": ("三角形",)}

QUESTION_TYPES = ("describe", "color", "count", "shape", "position")
FEWSHOT_TYPE = "background"
ALL_TYPES = (*QUESTION_TYPES, FEWSHOT_TYPE)

# Templates: {shape}, {color} are filled with words of the question's language.
TEMPLATES: dict[str, dict[Lang, tuple[str, ...]]] = {
    "describe": {
        "en": ("Describe this image.", "Describe the image.", "What is in this image?",
               "What do you see in the picture?"),
        "zh": ("描述这张图片。", "描述一下这张图片。", "这张图片里有什么？", "请描述这幅图。"),
    },
    "color": {
        "en": ("What color is the {shape}?", "What colour is the {shape}?", "What is the color of the {shape}?",
               "Which color does the {shape} have?"),
        "zh": ("{shape}是什么颜色的？", "{shape}是什么颜色？", "这个{shape}是什么颜色的？", "图中的{shape}是什么颜色？"),
    },
    "count": {
        "en": ("How many shapes are there?", "How many shapes are in the image?", "How many objects are there?",
               "How many shapes can you see?"),
        "zh": ("图中有几个图形？", "图片里有多少个图形？", "这张图片中有几个形状？", "图里一共有几个物体？"),
    },
    "shape": {
        "en": ("What shape is the {color} object?", "What is the shape of the {color} object?",
               "What shape is the {color} one?", "Which shape is {color}?"),
        "zh": ("{color}的物体是什么形状？", "{color}的图形是什么形状的？", "{color}的东西是什么形状？",
               "哪个形状是{color}的？"),
    },
    "position": {
        "en": ("Where is the {color} {shape}?", "Where is the {color} {shape} located?",
               "In which part of the image is the {color} {shape}?"),
        "zh": ("{color}的{shape}在哪里？", "{color}的{shape}在什么位置？", "{color}{shape}在图片的哪个位置？"),
    },
    "background": {
        "en": ("What color is the background?",),
        "zh": ("这张图片的背景是什么颜色？",),
    },
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS
    position: str  # one of POSITIONS
    center: tuple[int, int]  # pixel coordinates (x, y)
    size: int  # radius of the circle / half side of the square / the triangle's inradius-ish scale


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in POSITIONS order, the order descriptions name them
    background: str  # one of BACKGROUNDS

    def find(self, *, kind: str | None = None, color: str | None = None) -> Shape:
        """The one shape with this kind and/or colour (scenes guarantee there is at most one)."""
        hits = [s for s in self.shapes if (kind is None or s.kind == kind) and (color is None or s.color == color)]
        if len(hits) != 1:
            raise KeyError(f"scene has {len(hits)} shapes with kind={kind!r} color={color!r}")
        return hits[0]


@dataclass(frozen=True)
class QA:
    qtype: str  # one of ALL_TYPES
    lang: Lang
    question: str
    answer: str
    target: str  # the fact asked for (a colour, shape, position, count as a digit, or "" for describe)
    kind: str | None = None  # the shape the question names ("What color is the circle?")
    color: str | None = None  # the colour the question names ("What shape is the red object?")


def random_scene(rng: random.Random) -> Scene:
    """1-3 shapes with distinct kinds, colours and positions, on one of the background colours."""
    n = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(COLORS, n)
    positions = rng.sample(POSITIONS, n)
    shapes = []
    for kind, color, pos in zip(kinds, colors, positions, strict=True):
        ax, ay = ANCHORS[pos]
        center = (ax + rng.randint(-JITTER, JITTER), ay + rng.randint(-JITTER, JITTER))
        shapes.append(Shape(kind, color, pos, center, rng.randint(MIN_SIZE, MAX_SIZE)))
    shapes.sort(key=lambda s: POSITIONS.index(s.position))
    return Scene(tuple(shapes), rng.choice(BACKGROUNDS))


def scene_rng(seed: int, index: int) -> random.Random:
    """Scene ``index`` of stream ``seed``: independent of how many scenes were drawn before it."""
    return random.Random(f"visualglm-demo:{seed}:{index}")


def make_scenes(seed: int, count: int) -> list[Scene]:
    return [random_scene(scene_rng(seed, i)) for i in range(count)]


# ----- rendering -----------------------------------------------------------------------------------
def shape_polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """Vertices of a square or triangle (None for a circle)."""
    x, y, r = shape.center[0], shape.center[1], shape.size
    if shape.kind == "square":
        h = 0.9 * r  # about the circle's area
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape.kind == "triangle":
        big = 1.25 * r  # circumradius, centroid at the centre, pointing up
        return [(x, y - big), (x + 0.866 * big, y + 0.5 * big), (x - 0.866 * big, y + 0.5 * big)]
    return None


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image (drawn at 224x224; other sizes are scaled copies)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), RGB[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw_shape(draw, s, RGB[s.color])
    return img if size == IMAGE_SIZE else img.resize((size, size), Image.Resampling.BICUBIC)


def shape_index_map(scene: Scene) -> Image.Image:
    """A 224x224 "L" image: 0 on the background, i + 1 where ``scene.shapes[i]`` is drawn (exactly the pixels
    ``render`` paints), the ground truth for pretraining the vision tower."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene.shapes):
        _draw_shape(draw, s, i + 1)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill: tuple[int, int, int] | int) -> None:
    poly = shape_polygon(s)
    if poly is None:
        x, y, r = s.center[0], s.center[1], s.size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


# ----- questions and answers -----------------------------------------------------------------------
def _shape_word(kind: str, lang: Lang, rng: random.Random | None = None) -> str:
    if lang == "en":
        return kind
    aliases = ZH_SHAPE_ALIASES[kind]
    return rng.choice(aliases) if rng is not None else aliases[0]


def _color_word(color: str, lang: Lang) -> str:
    return color if lang == "en" else ZH[color]


def _phrase(s: Shape, lang: Lang) -> str:
    """'a red circle on the left' / '左边有一个红色的圆形'."""
    if lang == "en":
        article = "an" if s.color[0] in "aeiou" else "a"
        return f"{article} {s.color} {s.kind} {EN_WHERE[s.position]}"
    return f"{ZH[s.position]}有一个{ZH[s.color]}的{ZH[s.kind]}"


def describe(scene: Scene, lang: Lang) -> str:
    """Names the background colour, then every shape with its colour and position, in POSITIONS order.

    Descriptions are the only place the background appears in the training data: the model learns to see
    it, never to be asked about it (that question is what the few-shot demo teaches)."""
    n = len(scene.shapes)
    parts = [_phrase(s, lang) for s in scene.shapes]
    if lang == "en":
        on = f"on a {scene.background} background"
        if n == 1:
            return f"There is one shape {on}: {parts[0]}."
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"There are {EN_NUMBER[n]} shapes {on}: {listed}."
    return f"图中有{ZH_NUMBER[n]}个图形，背景是{ZH[scene.background]}的：" + "，".join(parts) + "。"


def answer(scene: Scene, qtype: str, lang: Lang, *, kind: str | None = None, color: str | None = None) -> str:
    """The one right answer, in the training data's wording."""
    if qtype == "describe":
        return describe(scene, lang)
    if qtype == "count":
        n = len(scene.shapes)
        if lang == "en":
            return "There is one shape." if n == 1 else f"There are {EN_NUMBER[n]} shapes."
        return f"图中有{ZH_NUMBER[n]}个图形。"
    if qtype == "background":
        b = scene.background
        return f"The background is {b}." if lang == "en" else f"背景是{ZH[b]}的。"
    s = scene.find(kind=kind, color=color)
    if qtype == "color":
        return f"The {s.kind} is {s.color}." if lang == "en" else f"{ZH[s.kind]}是{ZH[s.color]}的。"
    if qtype == "shape":
        return f"The {s.color} object is a {s.kind}." if lang == "en" else f"{ZH[s.color]}的物体是{ZH[s.kind]}。"
    if qtype == "position":
        if lang == "en":
            return f"The {s.color} {s.kind} is {EN_WHERE[s.position]}."
        return f"{ZH[s.color]}的{ZH[s.kind]}在{ZH[s.position]}。"
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(ALL_TYPES)}")


def ask(scene: Scene, qtype: str, lang: Lang, rng: random.Random) -> QA:
    """A random question of ``qtype`` about a random shape of the scene, with its answer."""
    if qtype not in TEMPLATES:
        raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(ALL_TYPES)}")
    template = rng.choice(TEMPLATES[qtype][lang])
    s = rng.choice(scene.shapes)
    question = template.format(shape=_shape_word(s.kind, lang, rng), color=_color_word(s.color, lang))
    kind = s.kind if qtype in ("color", "position") else None
    color = s.color if qtype in ("shape", "position") else None
    target = {"color": s.color, "shape": s.kind, "position": s.position, "count": str(len(scene.shapes)),
              "background": scene.background}.get(qtype, "")
    return QA(qtype, lang, question, answer(scene, qtype, lang, kind=kind, color=color), target, kind, color)
