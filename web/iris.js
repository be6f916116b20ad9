// IRIS in the browser: the pipeline of mobile.py's generate(), run by onnxruntime-web on
// the ONNX files export_mobile.py writes, with no server doing the work.
//
//     npm ci --prefix web && python web/serve.py out-shapes-flow/mobile-fp32   # then open the address it prints
//
// The parts, as in mobile.py: text_encoder.onnx (+ tokenizer.json) -> generator_prompt.onnx
// once per image; per step generator_prelude.onnx, generator_core.onnx r times, generator_coda.onnx;
// then vae_decoder.onnx. Tensors are flat Float32Arrays in PyTorch's (row-major) layout.
// The page's own code is at the bottom; window.iris is what it (and test_iris.py) calls.

import { Tokenizer } from '@huggingface/tokenizers';

// WebGPU only where the browser has a real adapter: a software fallback is slower than WASM,
// and the WASM-only runtime is the smaller download.
async function loadRuntime(threads) {
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  const webgpu = Boolean(adapter) && !adapter.isFallbackAdapter && !adapter.info?.isFallbackAdapter;
  const ort = await import(webgpu ? 'onnxruntime-web/webgpu' : 'onnxruntime-web');
  // threads need SharedArrayBuffer, which needs the cross-origin isolation headers (serve.py sends them)
  ort.env.wasm.numThreads = self.crossOriginIsolated ? threads : 1;
  return { ort, backend: webgpu ? 'webgpu' : 'wasm', threads: ort.env.wasm.numThreads };
}

class IrisError extends Error {}  // a message for the person at the page, not a stack trace

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new IrisError(`cannot reach ${url} (${e.message}); is python web/serve.py still running?`);
  }
  if (!response.ok) throw new IrisError(`${url}: ${response.status} ${response.statusText}; ${what}`);
  return response;
}

// flat-array helpers for the samplers' elementwise arithmetic
const map = (n, f) => Float32Array.from({ length: n }, (_, i) => f(i));
const concat = (a, b) => { const c = new a.constructor(a.length + b.length); c.set(a); c.set(b, a.length); return c; };

// torch's time_grid(steps, shift): steps + 1 times from 1 down to 0, in float32
function timeGrid(steps, shift) {
  return map(steps + 1, (i) => { const t = Math.fround(1 - i / steps); return shift * t / (1 + (shift - 1) * t); });
}

// Gaussian noise from a seed (mulberry32 and Box-Muller): reproducible in the page, but not
// torch.randn's numbers; the test hands the page Python's noise instead.
function gaussian(n, seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297;  // in (0, 1)
  };
  return map(n, () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
}

class Pipeline {
  // base: the export folder's URL, ending in '/'
  static async open(base, { threads = 2 } = {}) {
    const manifest = await (await fetchOk(base + 'mobile.json',
      'serve an export_mobile.py folder: python web/serve.py out-<run>/mobile-fp32')).json();
    if (!manifest.onnx) {
      throw new IrisError(`this export is ${manifest.precision} .pte only; the page runs ONNX: ` +
                          'export with python export_mobile.py --precision=fp32 or int8 (onnx=True)');
    }
    if (manifest.control) throw new IrisError('a control run draws from run_mobile.py --control_image; the page has no control input');
    if (!manifest.inputs || !manifest.state_init) {
      throw new IrisError("this export names neither its networks' inputs nor the Core's start (an older export_mobile.py): re-export the run");
    }
    const tokenizerJson = await (await fetchOk(base + 'tokenizer.json', 'export_mobile.py writes it beside the models')).json();
    return new Pipeline(base, manifest, new Tokenizer(tokenizerJson, {}), tokenizerJson.padding.pad_id,
                        await loadRuntime(threads));
  }

  constructor(base, manifest, tokenizer, padId, runtime) {
    Object.assign(this, { base, manifest, tokenizer, padId, ...runtime });
    this.sessions = {};
  }

  async session(name) {  // each ONNX file once, kept for the next image
    if (!this.sessions[name]) {
      const bytes = new Uint8Array(await (await fetchOk(`${this.base}${name}.onnx`,
        're-export the run: python export_mobile.py --out_dir=<run>')).arrayBuffer());
      try {
        this.sessions[name] = await this.ort.InferenceSession.create(bytes, { executionProviders: [this.backend] });
      } catch (e) {
        const tooBig = /memory|allocat|RangeError/i.test(String(e));
        throw new IrisError(tooBig
          ? `${name}.onnx (${(bytes.length / 1e6).toFixed(0)} MB) does not fit in this tab's memory: close other tabs, or export in int8 (export_mobile.py --precision=int8)`
          : `${name}.onnx cannot be loaded: ${e.message ?? e}`);
      }
    }
    return this.sessions[name];
  }

  // One ONNX call of a part's method, each tensor by its name (the manifest's inputs, which
  // export_mobile.py also gave the file) -> its output tensors, in order
  async run(part, method, named) {
    const expected = this.manifest.inputs[part][method], given = Object.keys(named);
    if (given.length !== expected.length || !expected.every((input) => input in named)) {
      throw new IrisError(`${part}.${method} takes ${expected.join(', ')}, not ${given.join(', ')}: re-export the run`);
    }
    const session = await this.session(method === 'forward' ? part : `${part}_${method}`);
    const results = await session.run(Object.fromEntries(session.inputNames.map((input) => [input, named[input]])));
    return session.outputNames.map((output) => results[output]);
  }

  tensor(type, data, dims) { return new this.ort.Tensor(type, data, dims); }

  // The exported tokenizer.json pads and truncates in Python; tokenizers.js does neither, so
  // here: cut to text_tokens keeping the template's last token ([SEP]), then pad with [PAD].
  tokenize(prompt) {
    const length = this.manifest.text_tokens;
    let ids = this.tokenizer.encode(prompt).ids;
    if (ids.length > length) ids = [...ids.slice(0, length - 1), ids[ids.length - 1]];
    return { ids: Array.from({ length }, (_, i) => (i < ids.length ? ids[i] : this.padId)),
             mask: Array.from({ length }, (_, i) => (i < ids.length ? 1 : 0)) };
  }

  async encodeText(prompt) {  // -> the text encoder's tokens (1, L, W) and the mask (1, L) as bytes
    const { ids, mask } = this.tokenize(prompt);
    const dims = [1, ids.length];
    const [tokens] = await this.run('text_encoder', 'forward', {
      input_ids: this.tensor('int64', BigInt64Array.from(ids, BigInt), dims),
      attention_mask: this.tensor('int64', BigInt64Array.from(mask, BigInt), dims) });
    return { tokens: tokens.data, mask: Uint8Array.from(mask) };
  }

  // -> RGBA pixels (S * S * 4) of one image. noise: the initial latent (1, C, h, w); renoise:
  // a consistency student's noise for each step; coreStart: a noise-started Core's s_0 for each
  // step (batch, N, D); each drawn from seed when not given.
  async generate({ prompt, steps, iters, cfgScale, seed = 0, noise, renoise, coreStart, onProgress = () => {} }) {
    if (!prompt || !prompt.trim()) throw new IrisError('the prompt is empty: write what to draw');
    const m = this.manifest, f32 = (data, dims) => this.tensor('float32', data, dims);
    const side = m.image_size / 16, latentSize = m.latent_channels * side * side;
    const student = m.sampler === 'consistency';  // a distill.py run: guidance is baked in, batch 1
    const batch = m.generator_batch;  // 2: the prompt and the empty prompt side by side (guidance)
    const calls = (student ? 2 : 3) + steps * (iters + 2) + 1;
    let done = 0;
    const tick = () => onProgress(++done / calls);

    const text = await this.encodeText(prompt); tick();
    let tokens = text.tokens, mask = text.mask;
    if (!student) {
      const empty = await this.encodeText(''); tick();
      tokens = concat(tokens, empty.tokens); mask = concat(mask, empty.mask);
    }
    const L = mask.length / batch, maskTensor = this.tensor('bool', mask, [batch, L]);
    const [textKV, textCond] = await this.run('generator', 'prompt', {
      text: f32(tokens, [batch, L, tokens.length / mask.length]), mask: maskTensor }); tick();

    const velocity = async (x, t, k) => {  // v(x, t) (batch, C, h, w) with every row at time t, at step k
      const z = f32(batch === 2 ? concat(x, x) : x, [batch, m.latent_channels, side, side]);
      const [e, cBase] = await this.run('generator', 'prelude', {
        z, t: f32(new Float32Array(batch).fill(t), [batch]), text_cond: textCond }); tick();
      let s = e;  // s_0: the Prelude's e, or Huginn's noise (the run's state_init)
      if (m.state_init === 'noise') {
        s = f32(coreStart ? coreStart[k] : gaussian(e.data.length, seed + 1 + steps + k), e.dims);
      }
      for (let i = 0; i < iters; i++) {  // s_{i+1} = Core(injection([s_i, e]), c_i), told its progress i / r
        [s] = await this.run('generator', 'core', {
          s, e, c_base: cBase, progress: f32(new Float32Array(batch).fill(i / iters), [batch]), text_kv: textKV,
          mask: maskTensor }); tick();
      }
      const [v] = await this.run('generator', 'coda', { s, c_base: cBase }); tick();
      return v.data;
    };

    let x = noise ? Float32Array.from(noise) : gaussian(latentSize, seed);
    const times = timeGrid(steps, student ? 1.0 : m.shift);
    for (let k = 0; k < steps; k++) {
      const t = times[k], tNext = times[k + 1];
      const v = await velocity(x, t, k);
      if (student) {  // predict x_0 = x - t v, then noise it to the next time (zero noise at t = 0)
        const eps = renoise ? renoise[k] : gaussian(latentSize, seed + 1 + k);
        x = map(latentSize, (j) => { const x0 = Math.fround(x[j] - t * v[j]); return (1 - tNext) * x0 + tNext * eps[j]; });
      } else {  // guidance v_u + w (v_c - v_u), then one Euler step
        x = map(latentSize, (j) => x[j] - (t - tNext) * (v[latentSize + j] + cfgScale * (v[j] - v[latentSize + j])));
      }
    }
    const [image] = await this.run('vae_decoder', 'forward', { z: f32(x, [1, m.latent_channels, side, side]) }); tick();
    const S = m.image_size, plane = S * S, rgba = new Uint8ClampedArray(plane * 4);
    for (let p = 0; p < plane; p++) {  // float [-1, 1] in (3, S, S) -> RGBA bytes, as data.to_uint8
      for (let c = 0; c < 3; c++) {
        rgba[4 * p + c] = Math.round((Math.min(1, Math.max(-1, image.data[c * plane + p])) + 1) * 127.5);
      }
      rgba[4 * p + 3] = 255;
    }
    return rgba;
  }
}

// -----------------------------------------------------------------------------
// The page: index.html's controls. ?export=URL names the export folder (default export/,
// where serve.py puts it) and ?threads=N the WASM threads (default 2).

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ready = Pipeline.open(params.get('export') ?? 'export/', { threads: Number(params.get('threads') ?? 2) });

function showError(e) {
  $('error').textContent = e instanceof IrisError ? `error: ${e.message}` : `error: ${e.message ?? e} (see the console)`;
  if (!(e instanceof IrisError)) console.error(e);
}

function setSlider(name, value, max) {
  Object.assign($(name), { max, value });
  $(name + '-value').textContent = value;
  $(name).oninput = () => { $(name + '-value').textContent = $(name).value; };
}

// Draws on the canvas; settings not given come from the controls. -> seconds it took; a failure
// is shown on the page, then thrown
async function draw(settings = {}) {
  const pipeline = await ready;
  const options = { prompt: $('prompt').value, steps: Number($('steps').value), iters: Number($('iters').value),
                    cfgScale: pipeline.manifest.cfg_scale, seed: Number($('seed').value), ...settings };
  $('error').textContent = '';
  $('draw').disabled = true;
  const start = performance.now();
  try {
    const rgba = await pipeline.generate({ ...options, onProgress: (done) => { $('progress').value = done; } });
    const side = pipeline.manifest.image_size, canvas = $('canvas');
    Object.assign(canvas, { width: side, height: side });
    canvas.getContext('2d').putImageData(new ImageData(rgba, side, side), 0, 0);
    const seconds = (performance.now() - start) / 1000;
    $('status').textContent = `${side}x${side}, ${options.steps} steps, r=${options.iters}: ${seconds.toFixed(1)} s ` +
      `(${pipeline.backend === 'wasm' ? `WASM, ${pipeline.threads} thread${pipeline.threads > 1 ? 's' : ''}` : 'WebGPU'})`;
    return seconds;
  } catch (e) {
    showError(e);
    throw e;
  } finally {
    $('draw').disabled = false;
  }
}

ready.then((pipeline) => {
  const m = pipeline.manifest;
  $('prompt').value = m.sample_prompt;
  setSlider('steps', m.steps, m.sampler === 'consistency' ? 4 : 50);
  setSlider('iters', m.iters, 32);
  $('model').textContent = `${m.image_size}px, ${m.sampler === 'consistency' ? 'distilled student' : 'teacher with guidance'}` +
    `${m.untrained ? ' (untrained: speed only)' : ''}`;
  $('status').textContent = 'ready: the first drawing also downloads the models';
  $('draw').disabled = false;
  $('draw').onclick = () => draw().catch(() => {});  // shown already
}, showError);

window.iris = { ready, draw };
