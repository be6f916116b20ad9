"""
The web page (web/) in headless Chromium, for the browser test and bench.py's timings:
serve an export folder with web/serve.py, open the page, draw, read the canvas back.

    with web_page('out-shapes-flow/mobile-fp32') as (page, _):
        seconds = page.evaluate('window.iris.draw({steps: 25, iters: 4})')

Needs Debian's chromium (apt-get install chromium; Playwright's own browser download cannot
work offline), Playwright (pip install -r web/requirements.txt) and the page's libraries
(npm ci --prefix web).
"""
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web')
# a closed network refuses Chromium's own connections (updates, sync), many at a time
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']


def missing():
    """Why the page cannot be driven here, in one line, or ''."""
    if not shutil.which('chromium'):
        return "Debian's chromium is not installed (apt-get install chromium)"
    if importlib.util.find_spec('playwright') is None:
        return "Playwright is not installed (pip install -r web/requirements.txt)"
    if not os.path.isdir(os.path.join(WEB, 'node_modules', 'onnxruntime-web')):
        return "the page's libraries are not installed (npm ci --prefix web)"
    return ''


@contextlib.contextmanager
def served(export_dir):
    """web/serve.py on a free port -> the page's address."""
    server = subprocess.Popen([sys.executable, os.path.join(WEB, 'serve.py'), export_dir, '0'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if ' at ' not in line:
            raise RuntimeError(f"web/serve.py did not start: {server.stderr.read().strip()}")
        yield line.split(' at ')[1].split()[0]
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def web_page(export_dir, query=''):
    """The page for export_dir, loaded in headless Chromium -> (Playwright page, the browser's
    user data folder, by which renderer_peak_mb finds its processes). query: '?threads=1' etc."""
    from playwright.sync_api import sync_playwright
    with served(export_dir) as url, tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=shutil.which('chromium'),
                                                                args=CHROMIUM_FLAGS, headless=True)
        page = context.pages[0]
        errors = []
        page.on('pageerror', lambda error: errors.append(error))
        page.goto(url + query)
        page.wait_for_function('window.iris !== undefined')
        try:
            yield page, profile
        finally:
            context.close()
        if errors:
            raise RuntimeError(f"the page threw: {errors[0]}")


def draw_with_noise(page, noise, generator, steps, core_start=None, **settings):
    """window.iris.draw from Python's noise: noise (1, C, h, w) to start from and, for a
    distilled student, each step's re-noising drawn from generator as flow.consistency_sample
    draws it; core_start: for a noise-started Core, its s_0 (batch, N, D) at each step.
    settings: the page's other draw() options. -> the seconds the page took."""
    renoise = [torch.randn(noise.shape, generator=generator).flatten().tolist() for _ in range(steps)]
    if core_start is not None:
        settings = dict(settings, coreStart=[s.flatten().tolist() for s in core_start])
    return page.evaluate('(o) => window.iris.draw(o)',
                         dict(settings, steps=steps, noise=noise.flatten().tolist(), renoise=renoise))


def canvas_pixels(page):
    """The canvas as uint8 (H, W, 3)."""
    width, height, data = page.evaluate("""() => { const c = document.getElementById('canvas');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]


def renderer_peak_mb(profile):
    """The peak resident memory of the browser's renderer processes (the tab), from Linux's
    VmHWM; 0 where /proc cannot tell."""
    peak = 0
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                command = f.read().decode(errors='replace')
            if '--type=renderer' not in command or profile not in command:
                continue
            with open(f'/proc/{pid}/status') as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024)
        except (OSError, StopIteration):
            continue
    return peak
