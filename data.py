"""
Captioned image data for IRIS, as uint8 tensors (N, 3, S, S) plus a list of captions.

Four sources, chosen by the scripts' `dataset` / `data_dir` settings:
  - 'shapes': the embedded default, procedural and deterministic by seed: one shape
    (type, colour, size, position) on a plain background, with a caption such as
    "a small red circle in the top left on a blue background". Any resolution.
  - 'scenes': procedural too: 1-4 shapes on grey, captioned with one of GenEval's six
    templates ("three squares", "a circle left of a diamond", "a red circle and a blue
    square"); the held-out captions are combinations never seen in training.
  - data_dir: a local folder in the Hugging Face `imagefolder` layout, images beside a
    metadata.jsonl whose rows hold "file_name" and "text":
        {"file_name": "0001.png", "text": "a drawing of a green dragon"}
  - any other name: a Hub data set through datasets.load_dataset (for example
    'reach-vb/pokemon-blip-captions'); offline this fails within seconds, not minutes.

Images are converted to RGB (transparency composited on white), centre-cropped to a
square and resized. Files that cannot be decoded, images over MAX_PIXELS, metadata lines
that are not UTF-8 JSON with a caption and a file inside the folder, and images no line
names are skipped, counted and reported once per kind.
"""
import io
import json
import math
import os
import random
import socket
import warnings
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from configurator import UsageError, UsageWarning

# -----------------------------------------------------------------------------
# the procedural shapes data set

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
MAX_PIXELS = 8192 * 8192  # larger images are skipped as suspicious (decompression bombs)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
SUPERSAMPLE = 4  # draw 4x larger and downsample, so edges are anti-aliased like real images


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
    elif shape == 'square':
        s = r * 0.85  # a square of the same area as the circle would look larger
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


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

# -----------------------------------------------------------------------------
# real images: a local imagefolder or a Hub data set


def to_square_rgb(img, image_size):
    """Any PIL image (grayscale, palette, RGBA, any size) -> RGB image_size x image_size."""
    if img.mode in ('RGBA', 'LA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        img = Image.new('RGB', rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel('A'))
    img = img.convert('RGB')
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))


def decode_rows(rows, image_size, source):
    """Decode rows of {'image': {'path', 'bytes'}, 'text'}; skip and count what fails."""
    images, captions, skipped = [], [], []
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # such images are skipped below, with a count
    for row in rows:
        ref = row['image']
        try:
            with Image.open(ref['path'] if ref.get('bytes') is None else io.BytesIO(ref['bytes'])) as img:
                if img.width * img.height > MAX_PIXELS:  # the header alone tells; decoding it could take GBs
                    raise ValueError(f"{img.width}x{img.height} is too large")
                img.draft('RGB', (image_size, image_size))  # JPEG: decode at reduced size, much faster
                images.append(np.asarray(to_square_rgb(img, image_size)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            skipped.append(f"{ref.get('path') or 'an embedded image'} ({type(e).__name__})")
            continue
        captions.append(str(row.get('text') or ''))
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", UsageWarning,
                      stacklevel=2)
    if not images:
        raise UsageError(f"no readable images in {source}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def read_metadata(data_dir):
    """The rows of data_dir/metadata.jsonl that name an image and a caption. A line that is
    not UTF-8 JSON with a "file_name" inside the folder and a non-empty "text", and an image
    in the folder that no line names, are skipped, counted and reported once."""
    path = os.path.join(data_dir, 'metadata.jsonl')
    rows, bad_lines = [], []
    with open(path, 'rb') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode('utf-8'))
                name, text = str(entry['file_name']), entry['text']
                if not isinstance(text, str) or not text.strip():
                    raise ValueError('no caption')
                if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == '..':
                    raise ValueError('a file outside the folder')
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                bad_lines.append(number)
                continue
            rows.append({'image': {'path': os.path.join(data_dir, name), 'bytes': None}, 'text': text})
    if bad_lines:
        warnings.warn(f"{path}: skipped {len(bad_lines)} line(s) that are not UTF-8 JSON with a file_name inside the "
                      f"folder and a caption, e.g. line {bad_lines[0]}", UsageWarning, stacklevel=3)
    named = {os.path.normpath(row['image']['path']) for row in rows}
    unnamed = [f for f in sorted(os.listdir(data_dir)) if f.lower().endswith(IMAGE_EXTENSIONS)
               and os.path.normpath(os.path.join(data_dir, f)) not in named]
    if unnamed:
        warnings.warn(f"{data_dir}: skipped {len(unnamed)} image(s) with no line in metadata.jsonl, e.g. {unnamed[0]}",
                      UsageWarning, stacklevel=3)
    return rows


def load_imagefolder(data_dir, image_size):
    if not os.path.isdir(data_dir):
        raise UsageError(f"data_dir '{data_dir}' is not a folder; point --data_dir at a folder of images "
                         f"with a metadata.jsonl")
    if not os.path.isfile(os.path.join(data_dir, 'metadata.jsonl')):
        raise UsageError(f"{data_dir} has no metadata.jsonl; add one line per image: "
                         '{"file_name": "0001.png", "text": "a caption"}')
    return decode_rows(read_metadata(data_dir), image_size, data_dir)


def _hub_reachable(timeout=3.0):
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(name, image_size):
    if not _hub_reachable():
        os.environ['HF_HUB_OFFLINE'] = '1'  # only a cached copy can load now; don't retry for minutes
    import datasets
    datasets.config.HF_HUB_OFFLINE = os.environ.get('HF_HUB_OFFLINE') == '1'
    try:
        ds = datasets.load_dataset(name, split='train')
    except Exception as e:  # datasets raises many types here; all mean "not available"
        raise UsageError(f"cannot load data set '{name}' from the Hub ({type(e).__name__}); check the name, "
                         f"or without network put its images in a folder with a metadata.jsonl and pass "
                         f"--data_dir=PATH") from None
    image_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None or 'text' not in ds.column_names:
        raise UsageError(f"data set '{name}' needs an image column and a 'text' column, has {ds.column_names}")
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    if image_column != 'image':  # the Pokemon set's is already 'image'; renaming onto itself fails
        ds = ds.rename_column(image_column, 'image')
    return decode_rows(ds, image_size, name)


def load_data(dataset, data_dir, image_size, num_images, num_holdout, seed=0):
    """(train_images, train_captions), (holdout_images, holdout_captions); images uint8 (N, 3, S, S)."""
    if data_dir:
        images, captions = load_imagefolder(data_dir, image_size)
    elif dataset == 'shapes':
        # the held-out set is drawn from another seed, so it shares no image with training
        return make_shapes(num_images, image_size, seed), make_shapes(num_holdout, image_size, seed + 1)
    elif dataset == 'scenes':  # the held-out set's captions are combinations training never sees
        return make_scenes(num_images, image_size, seed), make_scenes(num_holdout, image_size, seed + 1, test=True)
    else:
        images, captions = load_hub(dataset, image_size)
    if len(images) <= num_holdout:
        raise UsageError(f"{len(images)} images is too few to hold out {num_holdout}; lower --num_holdout")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held, train = order[:num_holdout], order[num_holdout:]
    return (images[train], [captions[i] for i in train]), (images[held], [captions[i] for i in held])


def image_tensor(img, image_size):
    """One PIL image -> uint8 (1, 3, S, S), converted and centre-cropped as the data sets are."""
    return torch.from_numpy(np.array(to_square_rgb(img, image_size))).permute(2, 0, 1)[None]


def open_image(path, what):
    """An image a user hands a script (--init_image, --control, ...) -> a decoded PIL image, or
    one error line: missing, unreadable, or over MAX_PIXELS, which the header tells before a
    decompression bomb is decoded."""
    too_large = f"--{what} {path} is over the {MAX_PIXELS // 2**20} Mpixel limit; resize it first"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # refused below, in one line
            image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            image.close()
            raise UsageError(too_large)
        image.load()  # PIL reads lazily: make a truncated file fail here, not deep inside a resize
        return image
    except Image.DecompressionBombError:  # PIL's own limit, twice its warning's
        raise UsageError(too_large) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --{what} {path} ({type(e).__name__}); give a PNG or JPEG file") from None


def check_output(path):
    """Refuse an --output PNG path that cannot be written, before any work: a missing folder or
    a file type PIL does not write."""
    folder, extension = os.path.dirname(path) or '.', os.path.splitext(path)[1].lower()
    if not os.path.isdir(folder):
        raise UsageError(f"--output {path}: folder {folder} does not exist; create it or choose another")
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise UsageError(f"--output {path}: '{extension}' is not an image type; end it in .png or .jpg")


def to_float(images):
    """uint8 [0, 255] -> float [-1, 1]"""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]"""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# control signals for the generator's ControlAdapter, computed from the images themselves

CONTROLS = {'edges': 0.15, 'silhouette': 0.25}  # each signal's threshold, on colour channels in [0, 1]


def map_image(maps):
    """Binary maps (N, 1, S, S) -> uint8 (N, 3, S, S), white on black, for a PNG grid."""
    return maps.mul(255).to(torch.uint8).expand(-1, 3, -1, -1).cpu()


def control_map(images, kind):
    """uint8 (N, 3, S, S) -> float (N, 1, S, S) in {0, 1}.
    'edges': where the Sobel gradient of any colour channel is steep (a 2 px line on each
    boundary, colour changes included that grey levels would miss); 'silhouette': where the
    colour differs from the background, read as the median colour of the image's border."""
    x = images.float() / 255
    if kind == 'edges':
        sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]]) / 4  # a unit step reads 1
        kernels = torch.stack([sobel, sobel.T])[:, None].repeat(3, 1, 1, 1)  # x and y for each channel
        gradient = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), kernels, groups=3)
        strength = gradient.unflatten(1, (3, 2)).square().sum(2).sqrt().amax(1, keepdim=True)
    elif kind == 'silhouette':
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 0], x[..., -1]], dim=-1)
        background = border.median(dim=-1).values[..., None, None]
        strength = (x - background).abs().amax(1, keepdim=True)
    else:
        raise ValueError(f"control must be one of {', '.join(CONTROLS)}, not {kind!r}")
    return (strength > CONTROLS[kind]).float()


def save_grid(images, path, columns=8):
    """Write uint8 (N, 3, S, S) images as one PNG grid."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
