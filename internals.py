"""
What a trained IRIS run does inside, as numbers and pictures (the notebook's figures):

    python internals.py --out_dir=out-shapes-flow          # writes out-shapes-flow/internals.png

- wavelet_view: an image, its four Haar subbands and the VAE's reconstruction (with its PSNR);
- gate_maps: GRFM's gate g per token, for each Core layer and iteration: where the Fourier
  pathway (g near 1) and where the recurrence (g near 0) wins;
- decay_by_distance: each head's Manhattan decay gamma^d against the distance d in tokens;
- fourier_energy: the energy of the Fourier pathway's output per spatial frequency;
- state_changes: ||s_{i+1} - s_i|| / ||s_i|| per Core iteration, what adaptive exit reads;
- loss_curves: the runs' log.csv.
The numbers come from forward hooks on a real sampling step; plotting needs matplotlib
(pip install -r requirements-notebook.txt), the numbers do not.
"""
import csv
import os

import torch
import torch.nn.functional as F

from configurator import configure
from data import to_float
from flow import encode_once
from model import GRFM
from vae import psnr, reconstruct
from wavelet import dwt


def wavelet_view(image, vae=None):
    """uint8 (3, S, S) -> {'LL', 'LH', 'HL', 'HH': (S/2, S/2, 3) subbands in [0, 1] to show
    (LL as the half-size image it is, the details as |coefficient| over the band's largest),
    and with a VAE 'reconstruction' (S, S, 3) uint8 and its 'psnr'}."""
    bands = dwt(to_float(image[None]))[0].unflatten(0, (4, 3))  # (4, 3, S/2, S/2); LL is the image x 2
    view = {'LL': (bands[0] / 4 + 0.5).clamp(0, 1).permute(1, 2, 0)}
    for name, band in zip(('LH', 'HL', 'HH'), bands[1:]):
        view[name] = (band.abs() / band.abs().max().clamp_min(1e-6)).permute(1, 2, 0)
    if vae is not None:
        reconstruction = reconstruct(vae, image[None])
        view['reconstruction'] = reconstruction[0].permute(1, 2, 0)
        view['psnr'] = psnr(reconstruction, image[None])
    return view


class Recorder:
    """Forward hooks that record, during one velocity call, each Core iteration's state and
    each GRFM's gate and Fourier output. Use as `with Recorder(model) as record: ...`."""

    def __init__(self, model):
        self.model, self.handles = model, []
        self.states, self.gates, self.fourier = [], [], []

    def __enter__(self):
        model = self.model
        D = model.config.dim
        # the injection reads [s_i, e] once per iteration; the last Core layer writes s_{i+1}
        self.handles.append(model.injection.register_forward_hook(
            lambda m, inputs, out: self.states.append(inputs[0][..., :D].detach().float())))
        self.handles.append(model.core[-1].register_forward_hook(
            lambda m, inputs, out: self.states.append(out.detach().float())))
        for layer in model.core:
            if isinstance(layer.mixer, GRFM):
                self.handles.append(layer.mixer.gate.register_forward_hook(
                    lambda m, inputs, out: self.gates.append(torch.sigmoid(out.detach().float()))))
                self.handles.append(layer.mixer.fourier.register_forward_hook(
                    lambda m, inputs, out: self.fourier.append(out.detach().float())))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def record_step(model, z, t, prompt, iters):
    """One velocity evaluation of the generator at noise level t on latents z (B, 16, h, w) ->
    a Recorder holding what the Core did at each of `iters` iterations."""
    velocity = encode_once(model, prompt)
    with Recorder(model) as record:
        velocity(z, torch.full((len(z),), t, device=z.device), iters)
    return record


def state_changes(record):
    """-> (iters,) the mean over samples of ||s_{i+1} - s_i|| / ||s_i||; each iteration logs
    s_i (the injection's input) then s_{i+1} (the last layer's output)."""
    before, after = torch.stack(record.states[0::2]), torch.stack(record.states[1::2])  # (r, B, N, D)
    return ((after - before).flatten(2).norm(dim=-1) / before.flatten(2).norm(dim=-1).clamp_min(1e-12)).mean(1)


def gate_maps(record, layers, hw):
    """-> (iters, layers, h, w): GRFM's gate g averaged over channels and samples, per token."""
    gates = torch.stack(record.gates).mean(dim=(1, 3))  # (r * layers, N)
    return gates.view(-1, layers, *hw)


def fourier_energy(record):
    """-> (iters * layers, frequencies): the Fourier pathway's output energy by the Chebyshev
    distance max(|ky|, |kx|) of its spatial frequency from DC, normalised per call."""
    energies = []
    for out in record.fourier:  # (B, h, w, D)
        power = torch.fft.fft2(out, dim=(1, 2), norm='ortho').abs().square().mean(dim=(0, 3))  # (h, w)
        h, w = power.shape
        ky, kx = torch.fft.fftfreq(h) * h, torch.fft.fftfreq(w) * w
        ring = torch.maximum(ky.abs()[:, None], kx.abs()[None, :]).long()
        energy = torch.zeros(int(ring.max()) + 1).index_add_(0, ring.flatten(), power.flatten())
        energies.append(energy / energy.sum())
    return torch.stack(energies)


def decay_by_distance(model, distances=16):
    """-> (layers, heads, distances): each GRFM head's Manhattan decay gamma^d for d = 0, 1, ...
    tokens (before the row normalisation that makes each token's weights sum to 1)."""
    d = torch.arange(distances, dtype=torch.float32)
    return torch.stack([torch.exp(F.logsigmoid(layer.mixer.spatial.gamma_logit.detach().float())[:, None] * d)
                        for layer in model.core if isinstance(layer.mixer, GRFM)])


def loss_curves(run_dirs):
    """{run folder: (steps, losses)} from each run's log.csv."""
    curves = {}
    for folder in run_dirs:
        with open(os.path.join(folder, 'log.csv')) as f:
            rows = list(csv.DictReader(f))
        curves[folder] = ([int(r['step']) for r in rows], [float(r['loss']) for r in rows])
    return curves


def summary(model, record, hw):
    """The figure's numbers as lines of text: the state change per iteration and, for a GRFM
    Core, its gate per layer and iteration, each head's decay gamma and the Fourier energy."""
    lines = [f"state change per iteration: {', '.join(f'{c:.3g}' for c in state_changes(record))}"]
    if not record.gates:
        return lines
    layers = len(model.core)
    maps = gate_maps(record, layers, hw)
    for layer in range(layers):
        lines.append(f"layer {layer}: gate g per iteration (mean over tokens, min-max): " + ", ".join(
            f"{m.mean():.2f} ({m.min():.2f}-{m.max():.2f})" for m in maps[:, layer]))
    lines.append("decay gamma per head: " + "; ".join(
        f"layer {layer} " + ", ".join(f"{g:.3f}" for g in heads)
        for layer, heads in enumerate(decay_by_distance(model, distances=2)[..., 1])))
    energy = fourier_energy(record).view(len(maps), layers, -1).mean(0)
    lines.append("Fourier pathway's energy by frequency 0, 1, ...: " + "; ".join(
        f"layer {layer} " + ", ".join(f"{e:.2f}" for e in shares) for layer, shares in enumerate(energy)))
    return lines


def plot_inside(model, record, hw, path):
    """One figure: the gate per layer and iteration, the decay per head, the Fourier energy per
    frequency and the state change per iteration. Writes `path` (PNG)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    layers, changes = len(model.core), state_changes(record)
    iters = len(changes)
    grfm = bool(record.gates)  # an attention Core has only the state to show
    rows, columns = (layers + 1, max(iters, 3)) if grfm else (1, 1)
    figure = plt.figure(figsize=(3 + 1.6 * iters, 2.4 * layers + 3.2) if grfm else (4, 3), constrained_layout=True)
    grid = figure.add_gridspec(rows, columns)
    if grfm:
        maps = gate_maps(record, layers, hw)
        for layer in range(layers):
            for i in range(iters):
                axis = figure.add_subplot(grid[layer, i])
                image = axis.imshow(maps[i, layer], vmin=0, vmax=1, cmap='coolwarm')
                axis.set_xticks([]), axis.set_yticks([])
                axis.set_title(f"layer {layer}, iteration {i + 1}", fontsize=8)
        figure.colorbar(image, ax=figure.axes, shrink=0.6, label='gate g: 1 Fourier, 0 recurrence')
    axis = figure.add_subplot(grid[rows - 1, 0])
    axis.plot(range(1, iters + 1), changes, 'o-')
    axis.set(xlabel='iteration i', ylabel='||s_i+1 - s_i|| / ||s_i||', yscale='log', title='state change')
    if grfm:
        axis = figure.add_subplot(grid[layers, 1])
        for layer, heads in enumerate(decay_by_distance(model)):
            for head, decay in enumerate(heads):
                axis.plot(decay, label=f"layer {layer}, head {head}")
        axis.set(xlabel='Manhattan distance (tokens)', ylabel='gamma^d', title='spatial decay per head')
        axis.legend(fontsize=6)
        axis = figure.add_subplot(grid[layers, 2])
        energy = fourier_energy(record).view(iters, layers, -1)
        for layer in range(layers):
            axis.plot(energy[:, layer].mean(0), 'o-', label=f"layer {layer}")
        axis.set(xlabel='frequency (cycles per grid)', ylabel='share of energy', title='Fourier pathway output')
        axis.legend(fontsize=6)
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == '__main__':
    from text import load_text_encoder
    from checkpoint import load_generator

    out_dir = ''  # a train_flow.py run; '' = the newest generator checkpoint under out*/
    prompt = ''  # '' = the run's first held-out sample prompt
    iters = 8  # Core iterations to record
    t = 0.5  # the noise level of the recorded step
    seed = 0
    configure(globals(), positive=('iters', 't'), ranges=dict(t=(0, 1)))
    torch.manual_seed(seed)  # a Core started from noise (state_init='noise') draws it from the global generator
    model, run, out_dir = load_generator(out_dir)
    encoder = load_text_encoder(model.config.text_encoder)
    side = run['image_size'] // 16
    z = torch.randn(1, model.config.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))
    record = record_step(model, z, t, encoder([prompt or run['sample_prompts'][0]]), iters)
    path, hw = os.path.join(out_dir, 'internals.png'), (side // model.config.patch_size,) * 2
    plot_inside(model, record, hw, path)
    print('\n'.join(summary(model, record, hw)))
    print(f"figure: {path}" + ('' if record.gates else f" (the Core's mixer is {model.config.mixer}: no GRFM panels)"))
