"""
The procedural data sets, drawn on the fly and deterministic by seed, and the geometry that
draws them, which metrics.py's analysers read them back with (written once, here):

  - shapes (config/shapes.py): one shape (type, colour, size, position) on a plain
    background, captioned "a small red circle in the top left on a blue background";
  - scenes (config/scenes.py): 1-4 shapes on grey, captioned with one of GenEval's six
    templates ("three squares", "a circle left of a diamond", "a red circle and a blue
    square"); held_out keeps a quarter of each task's combinations out of training.

    images, captions = make_shapes(16, 64, seed=0)      # uint8 (16, 3, 64, 64), 16 captions
    images, captions = make_scenes(16, 96, seed=1, test=True)

cache.py hashes this file into its key: a change to how a shape is drawn re-encodes the latents.
"""
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# shapes


SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLOURS = {  # far apart in RGB so that a nearest-colour reader cannot confuse them
    'red': (220, 40, 40), 'orange': (245, 140, 30), 'yellow': (240, 215, 40),
    'green': (40, 170, 60), 'blue': (40, 80, 220), 'purple': (140, 60, 180),
    'white': (245, 245, 245), 'black': (20, 20, 20),
}
RADII = {'small': 0.19, 'large': 0.28}  # radius as a fraction of the image side: small ones still span 1.5 latent cells
POSITIONS = {  # (x, y) centre as a fraction of the image side, and how a caption says it
    'top left': ((0.27, 0.27), 'in the top left'), 'top': ((0.5, 0.27), 'at the top'),
    'top right': ((0.73, 0.27), 'in the top right'), 'left': ((0.27, 0.5), 'on the left'),
    'center': ((0.5, 0.5), 'in the center'), 'right': ((0.73, 0.5), 'on the right'),
    'bottom left': ((0.27, 0.73), 'in the bottom left'), 'bottom': ((0.5, 0.73), 'at the bottom'),
    'bottom right': ((0.73, 0.73), 'in the bottom right'),
}
SUPERSAMPLE = 4  # draw 4x larger and downsample, so edges are anti-aliased like real images

# The shapes' geometry, which draw_one draws and metrics.py's analysers fit: each polygon's
# corners in units of its radius r around its centre, clockwise on the image (y grows down).
# A square as wide as the circle would look larger; a triangle's centroid sits 0.2 r below its centre.
OUTLINES = {
    'square': ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    'triangle': ((0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)),
    'diamond': ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
}


def area_per_r2(shape):
    """A shape's area over r^2 (the shoelace formula over its outline)."""
    if shape == 'circle':
        return math.pi
    corners = OUTLINES[shape]
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]))) / 2


def centroid_below_centre(shape):
    """How far below its centre a shape's centroid sits, in units of r (a triangle's: 0.2)."""
    corners = OUTLINES.get(shape, ((0.0, 0.0),))
    return sum(y for _, y in corners) / len(corners)  # the corners' mean: the centroid of these shapes


def inside(shape, x, y, r):
    """Boolean array: whether points at offsets (x, y) from a shape's centre (arrays, in
    pixels) are inside the shape of radius r: left of no clockwise edge."""
    if shape == 'circle':
        return x ** 2 + y ** 2 <= r ** 2
    corners = [(cx * r, cy * r) for cx, cy in OUTLINES[shape]]
    mask = True
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        mask = mask & ((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0)
    return mask


def shape_attributes(seed, index):
    """The attributes of image `index` of the shapes set `seed`; independent of set size."""
    rng = random.Random(f"shapes-{seed}-{index}")  # string seeds hash deterministically
    colour, background = rng.sample(sorted(COLOURS), 2)
    return dict(shape=rng.choice(SHAPES), colour=colour, size=rng.choice(sorted(RADII)),
                position=rng.choice(sorted(POSITIONS)), background=background,
                jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.9, 1.1)))


def shape_caption(a):
    return f"a {a['size']} {a['colour']} {a['shape']} {POSITIONS[a['position']][1]} on a {a['background']} background"


def conflicting_shape_captions(num_images, seed=0):
    """For each image of make_shapes(num_images, seed=seed): a caption with its colours but
    another type, position and (random) size. A control adapter trained on such pairs learns
    that the map, not the words, sets the layout."""
    rng = random.Random(f"conflicts-{seed}")
    captions = []
    for i in range(num_images):
        a = shape_attributes(seed, i)
        layout = dict(shape=rng.choice([s for s in SHAPES if s != a['shape']]), size=rng.choice(sorted(RADII)),
                      position=rng.choice([p for p in sorted(POSITIONS) if p != a['position']]))
        captions.append(shape_caption(a | layout))
    return captions


def draw_shape(a, image_size):
    """Render one attribute dict to an RGB PIL image of image_size x image_size."""
    S = image_size * SUPERSAMPLE
    img = Image.new('RGB', (S, S), COLOURS[a['background']])
    (fx, fy), _ = POSITIONS[a['position']]
    dx, dy, dr = a['jitter']
    cx, cy, r = (fx + dx) * S, (fy + dy) * S, RADII[a['size']] * dr * S
    draw_one(ImageDraw.Draw(img), a['shape'], cx, cy, r, COLOURS[a['colour']])
    return img.resize((image_size, image_size), Image.BOX)


def draw_one(draw, shape, cx, cy, r, fill):
    """One shape of 'radius' r centred at (cx, cy), in pixels of a PIL ImageDraw."""
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in OUTLINES[shape]], fill=fill)


def make_shapes(num_images, image_size, seed=0):
    """uint8 (N, 3, S, S) images and their captions, deterministic by seed."""
    attributes = [shape_attributes(seed, i) for i in range(num_images)]
    images = np.stack([np.asarray(draw_shape(a, image_size)) for a in attributes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [shape_caption(a) for a in attributes]

# -----------------------------------------------------------------------------
# scenes: 1-4 shapes on a plain background, captioned with the six templates of GenEval
# (Ghosh et al. 2023, arXiv 2310.11513), which test composition. metrics.read_scene reads
# them back exactly: the scene is known, so no detector is needed.

TASKS = ('single object', 'two objects', 'counting', 'colours', 'position', 'colour attribution')
SCENE_BACKGROUND = (128, 128, 128)  # grey: far from every palette colour
SCENE_RADIUS = 0.14  # of the image side: four shapes fit without touching
NUMBERS = {2: 'two', 3: 'three', 4: 'four'}
RELATIONS = ('left of', 'right of', 'above', 'below')
RELATION_GAP = 0.3  # a drawn relation's centres are this far apart on its axis, well over metrics.POSITION_MARGIN


def held_out(scene):
    """The fixed rule that keeps a quarter of each task's combinations out of training, so
    that every test caption is new: colour-shape bindings (colours), pairs of bindings
    (colour attribution), two types and a relation (position), a count of a type (counting),
    pairs of types (two objects). The four single-object captions are too few to split."""
    objects, task = scene['objects'], scene['task']
    s = [SHAPES.index(o['shape']) for o in objects]
    c = [sorted(COLOURS).index(o['colour']) for o in objects]
    if task == 'two objects':
        return (s[0] + s[1]) % 4 == 1
    if task == 'counting':
        return (len(s) + s[0]) % 4 == 0
    if task == 'colours':
        return (c[0] + s[0]) % 4 == 0
    if task == 'position':
        return (s[0] + 2 * s[1] + RELATIONS.index(scene['relation'])) % 4 == 0
    if task == 'colour attribution':
        return (c[0] + s[0] + c[1] + s[1]) % 4 == 0
    return False


def place(rng, count, relation=None):
    """(x, y, r) of `count` shapes inside the image that do not touch (a square's corner
    reaches 1.2 r); with a relation, the first shape is `relation` the second, clearly."""
    while True:
        spots = []
        for _ in range(100 * count):
            r = SCENE_RADIUS * rng.uniform(0.9, 1.1)
            x, y = rng.uniform(1.2 * r + 0.02, 0.98 - 1.2 * r), rng.uniform(1.2 * r + 0.02, 0.98 - 1.2 * r)
            if all(math.dist((x, y), (u, v)) > 1.2 * (r + q) + 0.05 for u, v, q in spots):
                spots.append((x, y, r))
                if len(spots) == count:
                    break
        if len(spots) == count and (relation is None or drawn_clearly(relation, spots[0], spots[1])):
            return spots


def drawn_clearly(relation, a, b):
    """a is `relation` b by RELATION_GAP on its axis, and roughly level on the other."""
    along, across = (0, 1) if relation in ('left of', 'right of') else (1, 0)
    sign = 1 if relation in ('left of', 'above') else -1  # image y grows downwards
    return sign * (b[along] - a[along]) >= RELATION_GAP and abs(b[across] - a[across]) <= 0.25


def scene_attributes(seed, index, test=False):
    """Scene `index` of the set `seed`: {'task', 'objects': [{'shape', 'colour', 'x', 'y', 'r'}],
    'relation'}, from the test combinations (held_out) or the training ones. The tasks take
    turns, so every set holds each about equally."""
    rng = random.Random(f"scenes-{seed}-{index}")
    task = TASKS[index % len(TASKS)]
    count = {'counting': rng.choice(sorted(NUMBERS)), 'two objects': 2, 'position': 2, 'colour attribution': 2}
    while True:
        n = count.get(task, 1)
        types = [rng.choice(SHAPES)] * n if task == 'counting' else rng.sample(SHAPES, n)
        colours = rng.sample(sorted(COLOURS), n) if task == 'colour attribution' else [
            rng.choice(sorted(COLOURS)) for _ in range(n)]
        relation = rng.choice(RELATIONS) if task == 'position' else None
        scene = dict(task=task, relation=relation, objects=[dict(shape=s, colour=c) for s, c in zip(types, colours)])
        if task == 'single object' or held_out(scene) == test:
            break
    for o, (x, y, r) in zip(scene['objects'], place(rng, n, relation)):
        o.update(x=x, y=y, r=r)
    return scene


def scene_caption(scene):
    o, task = scene['objects'], scene['task']
    a = lambda *words: ('an ' if words[0][0] in 'aeiou' else 'a ') + ' '.join(words)  # noqa: E731
    if task == 'single object':
        return a(o[0]['shape'])
    if task == 'two objects':
        return f"{a(o[0]['shape'])} and {a(o[1]['shape'])}"
    if task == 'counting':
        return f"{NUMBERS[len(o)]} {o[0]['shape']}s"
    if task == 'colours':
        return a(o[0]['colour'], o[0]['shape'])
    if task == 'position':
        return f"{a(o[0]['shape'])} {scene['relation']} {a(o[1]['shape'])}"
    return f"{a(o[0]['colour'], o[0]['shape'])} and {a(o[1]['colour'], o[1]['shape'])}"


def draw_scene(scene, image_size):
    S = image_size * SUPERSAMPLE
    img = Image.new('RGB', (S, S), SCENE_BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene['objects']:
        draw_one(draw, o['shape'], o['x'] * S, o['y'] * S, o['r'] * S, COLOURS[o['colour']])
    return img.resize((image_size, image_size), Image.BOX)


def make_scenes(num_images, image_size, seed=0, test=False):
    """uint8 (N, 3, S, S) scenes and their captions, deterministic by seed."""
    scenes = [scene_attributes(seed, i, test) for i in range(num_images)]
    images = np.stack([np.asarray(draw_scene(scene, image_size)) for scene in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [scene_caption(scene) for scene in scenes]
