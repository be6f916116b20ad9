"""
Captioned image data for IRIS, as uint8 tensors (N, 3, S, S) plus a list of captions.

Four sources, chosen by the scripts' `dataset` / `data_dir` settings:
  - 'shapes' and 'scenes': drawn by procedural.py, deterministic by seed (the default
    shapes: one shape on a plain background; scenes: GenEval's six templates, their
    held-out captions combinations never seen in training). Any resolution.
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
import os
import socket
import warnings
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from configurator import UsageError, UsageWarning
from procedural import make_scenes, make_shapes

# -----------------------------------------------------------------------------
# real images: a local imagefolder or a Hub data set

MAX_PIXELS = 8192 * 8192  # larger images are skipped as suspicious (decompression bombs)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')


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
