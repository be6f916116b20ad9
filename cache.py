"""
The training set as the generator sees it: normalised VAE latents (N, 16, h, w) and the
text encoder's tokens for every distinct caption, computed once and kept on disk.

On a CPU the two encoders cost as much as hundreds of training steps, so an epoch must
not re-run them. The cache file is cache_dir/<key>.safetensors, where the key hashes the
data settings (and for the procedural sets, procedural.py, which draws them), the VAE checkpoint's
bytes and the text encoder's name: change any of them and a new cache is built; nothing
stale is ever read. The held-out captions (for sample
grids and the adherence eval) are stored with it, so a cache hit loads no image at all.
The control maps a ControlAdapter trains on (data.control_map) are cached the same way,
in their own file.
"""
import hashlib
import inspect
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import procedural
from data import CONTROLS, control_map, load_data, to_float
from text import Prompt, sha256_file


@torch.no_grad()
def encode_captions(encoder, captions, batch_size=256):
    """Distinct captions -> tokens (U, L, width) fp16, mask (U, L); and each caption's row. On
    the CPU, wherever the encoder runs: a step moves its batch to the device."""
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    pieces = [Prompt(*encoder(distinct[i:i + batch_size]))
              for i in tqdm(range(0, len(distinct), batch_size), desc='text', leave=False)]
    length = max(piece.text.shape[1] for piece in pieces)
    pieces = [piece.padded(length) for piece in pieces]
    tokens = torch.cat([piece.text for piece in pieces]).half().cpu()
    mask = torch.cat([piece.mask for piece in pieces]).cpu()
    return tokens, mask, torch.tensor([row[c] for c in captions])


@torch.no_grad()
def encode_images(vae, images, batch_size=128):
    """uint8 images (N, 3, H, W) -> their latents (N, 16, H/16, W/16) on the CPU. An image that
    is there several times (a data set with several captions per image) is encoded once."""
    keys = [hashlib.sha256(image.numpy().tobytes()).digest() for image in images]
    first = {}  # each distinct image's first row, in order
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    distinct = images[list(first.values())]
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode_latent(to_float(distinct[i:i + batch_size]).to(device)).float().cpu()
                         for i in tqdm(range(0, len(distinct), batch_size), desc='latents', leave=False)])
    slot = {key: i for i, key in enumerate(first)}
    return latents[[slot[key] for key in keys]]


def cache_path(cache_dir, data_settings, **more):
    """cache_dir/<key>.safetensors and the identity the key hashes: the data settings, what
    else makes the data (the code that draws it, the metadata's bytes) and `more`."""
    identity = dict(data_settings, **more)
    if not data_settings['data_dir'] and data_settings['dataset'] in ('shapes', 'scenes'):
        # the code that draws and captions them is data too
        identity['drawing'] = hashlib.sha256(inspect.getsource(procedural).encode()).hexdigest()
    if data_settings['data_dir']:  # a folder's contents can change under the same name
        metadata = os.path.join(data_settings['data_dir'], 'metadata.jsonl')
        identity['metadata'] = sha256_file(metadata) if os.path.isfile(metadata) else None
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{key}.safetensors"), identity


def save_atomically(data, path, metadata):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # under torchrun every process may build it at once
    save_file(data, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_cache(path):
    """-> (tensors on the CPU, metadata) of a cache file."""
    with safe_open(path, framework='pt') as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def load_training_set(data_settings, vae, vae_dir, encoder, cache_dir):
    """data_settings: the load_data arguments (dataset, data_dir, image_size, num_images,
    num_holdout). Returns dict(latents, caption_ids, tokens, mask, holdout_captions)."""
    path, identity = cache_path(cache_dir, data_settings, text_encoder=encoder.name,
                                vae=sha256_file(os.path.join(vae_dir, 'ckpt.safetensors')))
    if not os.path.isfile(path):
        (images, captions), (_, holdout_captions) = load_data(**data_settings)
        tokens, mask, caption_ids = encode_captions(encoder, captions)
        tensors = dict(latents=encode_images(vae, images), caption_ids=caption_ids, tokens=tokens, mask=mask)
        save_atomically(tensors, path,
                        metadata=dict(identity=json.dumps(identity), holdout_captions=json.dumps(holdout_captions)))
        print(f"cache: encoded {len(images)} images and {len(tokens)} distinct captions into {path}")
    # read back even when just built, so a first run gets exactly what every later run gets
    # (CPU tensors of the stored dtypes), whatever device the encoders ran on
    tensors, metadata = read_cache(path)
    print(f"cache: {len(tensors['latents'])} latents and {len(tensors['tokens'])} captions from {path}")
    return dict(tensors, holdout_captions=json.loads(metadata['holdout_captions']))


def load_control_maps(data_settings, kind, cache_dir):
    """The control maps (data.control_map) of the training images, in the order of
    load_training_set's latents, and of the held-out ones: uint8 (N, 1, S, S) in {0, 1}."""
    path, identity = cache_path(cache_dir, data_settings, control=kind, thresholds=repr(CONTROLS))
    if not os.path.isfile(path):
        (images, _), (holdout_images, _) = load_data(**data_settings)
        maps = {name: torch.cat([control_map(x[i:i + 1024], kind).to(torch.uint8) for i in range(0, len(x), 1024)])
                for name, x in (('train', images), ('holdout', holdout_images))}
        save_atomically(maps, path, metadata=dict(identity=json.dumps(identity)))
        print(f"cache: {kind} maps of {len(images)} images into {path}")
    maps, _ = read_cache(path)  # as load_training_set: a first run gets what later runs read
    return maps['train'], maps['holdout']
