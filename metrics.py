"""
Measures of images that need no pretrained network, shared by the eval scripts:

- the shapes analyser (eval_shapes.py): it labels every pixel with the nearest of the 8
  palette colours (the most common label is the background, the next the shape), then
  compares the shape's pixels with the four shapes as procedural.py draws them, each with the same
  area and centroid: the best overlap (IoU) names the type, and that template's centre and
  radius give the position (nearest of the 9) and the size;
- the scenes analyser (eval_scenes.py): each connected region of one palette colour on the
  grey is an object, typed as above; a scene is right by GenEval's rules for its task;
- for real images (eval_real.py): SSIM (Wang et al. 2004), the Fréchet distance of two
  feature sets, a small group classifier trained on the training split, and sharpness;
- control agreement (both): the F1 of two binary maps within a pixel's tolerance.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import to_float
from procedural import (COLOURS, POSITIONS, RADII, SCENE_BACKGROUND, SCENE_RADIUS, SHAPES, TASKS, area_per_r2,
                        centroid_below_centre, inside)
from wavelet import dwt

# -----------------------------------------------------------------------------
# the shapes analyser

ATTRIBUTES = ('background', 'colour', 'shape', 'position', 'size')
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
CENTRES = np.array([centre for centre, _ in POSITIONS.values()], dtype=np.float32)


def shape_template(shape, cx, cy, r, size):
    """Boolean (size, size) mask of a shape as procedural.draw_one draws it, sampled at pixel centres."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return inside(shape, x - cx, y - cy, r)


def read_shape(mask):
    """A boolean (S, S) mask of one shape -> (type, centre (x, y) and radius as fractions of
    the side): of the four templates with the mask's area and centroid, the one that
    overlaps it most (IoU)."""
    S, area = mask.shape[0], mask.sum()
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    best_iou = -1.0
    for shape in SHAPES:
        r = math.sqrt(area / area_per_r2(shape))
        centre_y = cy - centroid_below_centre(shape) * r  # the template's centroid on the mask's
        template = shape_template(shape, cx, centre_y, r, S)
        iou = (template & mask).sum() / (template | mask).sum()
        if iou > best_iou:
            best_iou, found = iou, (shape, np.array([cx, centre_y]) / S, r / S)
    return found


def nearest_colours(image, palette):
    """uint8 (3, S, S) -> (S, S) the index of each pixel's nearest palette colour."""
    pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
    return np.square(pixels[:, :, None] - palette).sum(-1).argmin(-1)


def analyse(image):
    """uint8 (3, S, S) -> the attributes it shows, as in procedural.shape_attributes."""
    labels = nearest_colours(image, PALETTE)
    counts = np.bincount(labels.ravel(), minlength=len(PALETTE))
    background, colour = np.argsort(-counts)[:2]
    names = list(COLOURS)
    found = dict(background=names[background], colour=names[colour], shape=None, position=None, size=None)
    mask = labels == colour
    if mask.sum() < 4:
        return found
    found['shape'], centre, radius = read_shape(mask)
    found['position'] = list(POSITIONS)[np.square(CENTRES - centre).sum(-1).argmin()]
    found['size'] = 'small' if radius < (RADII['small'] + RADII['large']) / 2 else 'large'
    return found


def adherence(images, attributes):
    """Fraction right per attribute, all of the four the caption names first, and all five."""
    found = [analyse(image) for image in images]
    right = {a: np.mean([f[a] == t[a] for f, t in zip(found, attributes)]) for a in ATTRIBUTES}
    right['all 4'] = np.mean([all(f[a] == t[a] for a in ATTRIBUTES[:4]) for f, t in zip(found, attributes)])
    right['all 5'] = np.mean([all(f[a] == t[a] for a in ATTRIBUTES) for f, t in zip(found, attributes)])
    return right


# -----------------------------------------------------------------------------
# the scenes analyser, scored with GenEval's rules (Ghosh et al. 2023)

SCENE_PALETTE = np.array([SCENE_BACKGROUND, *COLOURS.values()], dtype=np.float32)  # label 0: the background
MIN_AREA = 0.4 * area_per_r2('triangle') * (0.9 * SCENE_RADIUS) ** 2  # of the image: less is an edge's fringe
POSITION_MARGIN = 0.1  # of the side: how far apart two centres must be on an axis to be left of, above, ...


def connected_regions(mask):
    """4-connected regions of a boolean (S, S) mask -> (S, S) labels, 0 outside: every
    pixel takes the largest index in its region, spread one pixel a pass."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        grown = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]) * mask
        if (grown == labels).all():
            return labels
        labels = grown


def read_scene(image):
    """uint8 (3, S, S) -> the objects it shows, [{'shape', 'colour', 'x', 'y'}]: each connected
    region of one palette colour, larger than MIN_AREA, is one object."""
    colours, S = nearest_colours(image, SCENE_PALETTE), image.shape[-1]
    objects = []
    for index, name in enumerate(COLOURS, 1):
        regions = connected_regions(colours == index)
        for label in np.unique(regions[regions > 0]):
            mask = regions == label
            if mask.sum() >= MIN_AREA * S * S:
                shape, (x, y), _ = read_shape(mask)
                objects.append(dict(shape=shape, colour=name, x=x, y=y))
    return objects


def relation_holds(relation, a, b):
    """a is `relation` b, by their centres and POSITION_MARGIN (image y grows downwards)."""
    return {'left of': b['x'] - a['x'], 'right of': a['x'] - b['x'],
            'above': b['y'] - a['y'], 'below': a['y'] - b['y']}[relation] > POSITION_MARGIN


def scene_correct(found, scene):
    """GenEval's rule for the scene's task: the named objects present (exactly as many, for
    counting), with the named colours, in the named relation; other objects do not count."""
    named, task = scene['objects'], scene['task']
    of = lambda o: [f for f in found if f['shape'] == o['shape']]  # noqa: E731
    coloured = lambda o: any(f['colour'] == o['colour'] for f in of(o))  # noqa: E731
    if task == 'counting':
        return len(of(named[0])) == len(named)
    if task == 'position':
        return any(relation_holds(scene['relation'], a, b) for a in of(named[0]) for b in of(named[1]))
    if task in ('colours', 'colour attribution'):
        return all(coloured(o) for o in named)
    return all(of(o) for o in named)  # single object, two objects


STRUCTURE = ('types missing', 'right', 'reversed', 'neither')


def structure(found, scene):
    """Why a position or colour-attribution scene (two objects) is right or wrong: 'types
    missing' where a named type is not drawn; else 'right' (scene_correct), 'reversed' where
    the relation or the colours hold with the two objects swapped (the caption read as a bag
    of words), or 'neither'."""
    named = scene['objects']
    first, second = ([f for f in found if f['shape'] == o['shape']] for o in named)
    if not (first and second):
        return 'types missing'
    if scene['task'] == 'position':
        holds = lambda a, b: any(relation_holds(scene['relation'], x, y) for x in a for y in b)  # noqa: E731
        right, reversed_ = holds(first, second), holds(second, first)
    else:
        coloured = lambda objects, o: any(f['colour'] == o['colour'] for f in objects)  # noqa: E731
        right = coloured(first, named[0]) and coloured(second, named[1])
        reversed_ = coloured(first, named[1]) and coloured(second, named[0])
    return 'right' if right else 'reversed' if reversed_ else 'neither'


def structure_shares(found, scenes):
    """{task: {outcome: fraction}} of structure() for the position and colour-attribution scenes;
    found[i] is read_scene of the image drawn for scenes[i]."""
    outcomes = {}
    for objects, scene in zip(found, scenes):
        if scene['task'] in ('position', 'colour attribution'):
            outcomes.setdefault(scene['task'], []).append(structure(objects, scene))
    return {task: {o: float(np.mean([x == o for x in seen])) for o in STRUCTURE} for task, seen in outcomes.items()}


def geneval(found, scenes):
    """Fraction right per task present and 'overall', their mean (GenEval's overall score);
    found[i] is read_scene of the image drawn for scenes[i]."""
    right = [scene_correct(objects, scene) for objects, scene in zip(found, scenes)]
    scores = {task: np.mean([r for r, s in zip(right, scenes) if s['task'] == task]) for task in TASKS
              if any(s['task'] == task for s in scenes)}
    scores['overall'] = np.mean(list(scores.values()))
    return scores


# -----------------------------------------------------------------------------
# real images


def ssim(images, references, window=11, sigma=1.5, batch=64):
    """Mean SSIM of uint8 (N, 3, H, W) batches: Gaussian-weighted local means, variances and
    covariance per channel, with the paper's constants for 8-bit images. In float64, batch
    images at a time: the whole test split at once holds a dozen float64 copies of it."""
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - window // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=3)  # noqa: E731 ('valid': no padding artefacts)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    total = 0.0
    for i in range(0, len(images), batch):
        x, y = images[i:i + batch].double(), references[i:i + batch].double()
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        total += s.mean(dim=(1, 2, 3)).sum().item()  # every image has as many pixels
    return total / len(images)


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), in float64.
    Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), which is symmetric."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


class GroupClassifier(nn.Module):
    """Four stride-2 conv blocks and a linear head; features() is the pooled 128-d vector of
    uint8 images, read at size x size."""

    def __init__(self, groups, size):
        super().__init__()
        self.size = size
        layers, width = [], 3
        for out in (32, 64, 128, 128):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.SiLU()]
            width = out
        self.body, self.head = nn.Sequential(*layers), nn.Linear(width, groups)

    def resized(self, images):
        return F.interpolate(to_float(images), size=self.size, mode='area')

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(images, labels, groups, size=64, steps=3000, batch_size=64, seed=0):
    """Batches drawn group-balanced (People & Body is over half of Twemoji: a classifier trained
    on plain batches learns to answer it, and its accuracy says little), mirrored and shifted."""
    torch.manual_seed(seed)
    model = GroupClassifier(groups, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    x = F.pad(model.resized(images), (4, 4, 4, 4), value=1.0)  # white, like the images' background
    weights = 1.0 / torch.bincount(labels, minlength=groups).float()[labels]
    for _ in range(steps):
        index = torch.multinomial(weights, batch_size, replacement=True)
        dx, dy = torch.randint(9, (2,)).tolist()
        batch = x[index, :, dy:dy + size, dx:dx + size]
        batch = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch, batch.flip(-1))
        loss = F.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def read(classifier, images):
    """-> (predicted group, features) for uint8 images."""
    features = torch.cat([classifier.features(classifier.resized(images[i:i + 256]))
                          for i in range(0, len(images), 256)])
    return classifier.head(features).argmax(-1), features


def accuracy(predicted, labels):
    """(balanced accuracy, plain accuracy): the first is the mean of the per-group recalls, so
    that each group counts the same however many test images it has."""
    recalls = [(predicted[labels == g] == g).float().mean() for g in labels.unique() if g >= 0]  # -1: unseen group
    return torch.stack(recalls).mean().item(), (predicted == labels).float().mean().item()


def nearest_distance(features, reference):
    """For each row of features, the L2 distance to its nearest row of reference, and which."""
    distance = torch.cdist(features, reference)
    return distance.min(dim=1)


def sharpness(images, references):
    """Energy of the Haar detail subbands (LH, HL, HH) relative to the references'."""
    detail = lambda x: dwt(to_float(x).double())[:, 3:].square().sum()  # noqa: E731 (channels 0-2 are LL)
    return (detail(images) / detail(references)).item()


# -----------------------------------------------------------------------------
# control agreement


def control_f1(maps, references, tolerance=1):
    """Per-image F1 of binary maps (N, 1, S, S) against reference maps: precision is the share
    of a map's pixels within `tolerance` pixels of a reference pixel, recall the converse
    (edges drawn one pixel off still agree, as in the BSDS edge benchmark)."""
    near = lambda m: F.max_pool2d(m, 2 * tolerance + 1, stride=1, padding=tolerance)  # noqa: E731
    precision = (maps * near(references)).sum((1, 2, 3)) / maps.sum((1, 2, 3)).clamp_min(1)
    recall = (references * near(maps)).sum((1, 2, 3)) / references.sum((1, 2, 3)).clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-8)
