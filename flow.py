"""
Rectified flow (Liu et al. 2022, arXiv 2209.03003; SD3's recipe, Esser et al. 2024): the
generator is any `model(z, t, text, mask, iters)` that returns a velocity, and a caption
travels as a text.Prompt (text, mask).

    x_t = (1 - t) x_0 + t eps,   t ~ sigmoid(N(0, 1)),   target v = eps - x_0
    sample: Euler from t = 1 (noise) to t = 0 (data), x <- x - dt * v
    guidance: v = v_u + w (v_c - v_u), the unconditional branch seeing the empty prompt

and its few-step form, a consistency model (Song et al. 2023, arXiv 2303.01469) that
reuses the same network: f(x_t, t) = x_t - t v(x_t, t) predicts x_0 and is exactly x at
t = 0; sampling predicts x_0, re-noises to the next time and repeats (distill.py).

text_to_image and upscale at the end wrap the maths with the text encoder and the VAE:
captions in, uint8 images out.
"""
import contextlib

import torch
import torch.nn.functional as F

from data import to_float, to_uint8
from text import Prompt
from wavelet import impose_lowpass


def noised(x0, noise, t):
    """x_t = (1 - t) x_0 + t eps."""
    return (1 - t) * x0 + t * noise


WEIGHTINGS = ('none', 'high_noise')  # flow_loss's


@contextlib.contextmanager
def own_random_numbers(seed, device):
    """What is drawn inside (a noise-started Core's s_0: a sample grid's, a held-out loss's) comes
    from `seed`, and torch's global generator is left as it was: work that only the master
    process does must not move the generator every process shares, and each grid or r draws
    the same s_0 as the last."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        yield


def flow_loss(model, x0, prompt, iters, t, eps, weighting='none', loop_distill=0.0, control_map=None, core_start=None):
    """Per-sample loss (B,) of the velocity model(x_t, t) against its target eps - x_0, at
    times t (B,) and noise eps (shaped like x0), which the caller draws (train_flow.py: SD3's
    logit-normal t).

    weighting 'none' is SD3's choice; 'high_noise' is the seed document's t / (1 - t + 0.05),
    which leans on the noisy end, where the layout is decided.

    loop_distill > 0 adds intra-loop self-distillation (ELT, Goyal et al. 2026, arXiv
    2604.09168): the velocity read after each earlier iteration that keeps gradients is pulled
    towards the last one's, held fixed, with this weight, so that fewer iterations at sampling
    time land near what r draw. control_map: control maps (B, 1, H, W) for a generator with an
    adapter (model.ControlAdapter); core_start: a noise-started Core's s_0 (Iris.forward)."""
    x_t = noised(x0, eps, t.view(-1, 1, 1, 1))
    extra = {} if control_map is None else dict(control_map=control_map)  # a model without an adapter takes none
    extra |= {} if core_start is None else dict(core_start=core_start)
    if loop_distill:
        readouts = model(x_t, t, prompt.text, prompt.mask, iters, every_iteration=True, **extra).float()  # (k, B, ...)
        v = readouts[-1]
        early = (readouts[:-1] - v.detach()).square().mean(dim=(2, 3, 4)).sum(0) / max(len(readouts) - 1, 1)
    else:
        v, early = model(x_t, t, prompt.text, prompt.mask, iters, **extra).float(), 0.0
    error = (v - (eps - x0)).square().mean(dim=(1, 2, 3)) + loop_distill * early
    if weighting == 'high_noise':
        error = error * t / (1 - t + 0.05)
    return error


@torch.no_grad()
def held_out_loss(model, latents, prompt, iters, batch_size, seed=0, exit_tolerance=0.0, record_iters=None):
    """SD3's validation loss: the mean flow loss of held-out latents at t = 1/8, 3/8, 5/8, 7/8,
    with one fixed noise per image, at r = iters (with exit_tolerance and record_iters as in
    encode_once). -> the four bands' means. A noise-started Core's s_0 is drawn from `seed`
    too, so that every r is measured on the same draws."""
    def network(x, t, text, mask, iters):
        velocity = encode_once(model, Prompt(text, mask), exit_tolerance=exit_tolerance, record_iters=record_iters)
        return velocity(x, t, iters)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device)
    batches = [slice(i, i + batch_size) for i in range(0, len(latents), batch_size)]
    with own_random_numbers(seed, latents.device):
        return [torch.cat([flow_loss(network, latents[b], prompt.rows(b), iters,
                                     torch.full((len(latents[b]),), t, device=latents.device), noise[b])
                           for b in batches]).mean().item() for t in (0.125, 0.375, 0.625, 0.875)]


def shift_time(t, shift):
    """SD3's resolution shift, t' = s t / (1 + (s - 1) t): s > 1 moves times towards noise,
    because more pixels keep more of the signal at the same t (Esser et al. 2024, arXiv
    2403.03206); s = sqrt(tokens / base tokens) when a model moves to a larger image."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps, shift=1.0, t_start=1.0):
    """steps + 1 times from t_start down to 0, shifted as training drew them (shift_time)."""
    return shift_time(torch.linspace(t_start, 0.0, steps + 1), shift)


def encode_once(model, prompt, hint=None, exit_tolerance=0.0, record_iters=None):
    """model(x, t, text, mask, iters) for a prompt that stays the same through sampling, as
    v(x, t, iters): the prompt is encoded once per sampling call (Iris.encode_prompt: every
    cross-attention's keys and values of the text), not at every step.
    hint: a control map's, from Iris.encode_control, or None. exit_tolerance > 0: adaptive
    iterations, iters the most (model.iterate_core). record_iters(used), when given, is called
    after every evaluation with the iterations each sample ran (B,)."""
    encoded = model.encode_prompt(prompt.text, prompt.mask)

    def velocity(x, t, iters):
        v, used = model.velocity(x, t, encoded, iters, hint, exit_tolerance)
        if record_iters is not None:
            record_iters(used)
        return v
    return velocity


def guided(model, prompt, null_prompt, cfg_scale, hint=None, exit_tolerance=0.0, record_iters=None):
    """-> v(x, t, iters), t a scalar or (B,): classifier-free guidance, v_u + w (v_c - v_u),
    with both branches in one batch and the prompts encoded once. null_prompt is the empty
    caption's (1 row). A control's hint acts on both branches (as in ControlNet), so guidance
    sharpens the text's share only. exit_tolerance, record_iters: as in encode_once."""
    if cfg_scale == 1.0:
        velocity = encode_once(model, prompt, hint, exit_tolerance, record_iters)
        return lambda x, t, iters: velocity(x, t.expand(len(x)), iters)
    length = max(prompt.text.shape[1], null_prompt.text.shape[1])
    prompt, null_prompt = prompt.padded(length), null_prompt.padded(length)
    both = Prompt(torch.cat([prompt.text, null_prompt.text.expand(len(prompt.text), -1, -1)]),
                  torch.cat([prompt.mask, null_prompt.mask.expand(len(prompt.mask), -1)]))
    velocity = encode_once(model, both, None if hint is None else torch.cat([hint, hint]), exit_tolerance, record_iters)

    def guided_velocity(x, t, iters):
        t = t.expand(len(x))
        v_cond, v_uncond = velocity(torch.cat([x, x]), torch.cat([t, t]), iters).float().chunk(2)  # fp32 under autocast
        return v_uncond + cfg_scale * (v_cond - v_uncond)
    return guided_velocity


@torch.no_grad()
def euler_sample(model, noise, prompt, null_prompt, steps=25, cfg_scale=4.0, iters=8, shift=1.0, init=None,
                 strength=1.0, keep=None, hint=None, exit_tolerance=0.0, record_iters=None):
    """Integrate dx/dt = v from t = strength (1: pure noise) to t = 0; returns x_0 (B, 16, h, w).

    Editing with the same model: img2img (SDEdit, Meng et al. 2021, arXiv 2108.01073)
    starts from the latent `init` noised to t = strength. Inpainting also passes keep
    (1 or B, 1, h, w) in [0, 1], 1 where init must stay: after every step that region is
    re-imposed from init noised to the current t, with the same noise, blended where
    0 < keep < 1 (the border), and is exactly init at t = 0. hint: a control map's, from
    Iris.encode_control, or None. exit_tolerance, record_iters: as in encode_once."""
    times = time_grid(steps, shift, strength).to(noise.device)
    if init is not None and strength == 0:
        return init.expand_as(noise)
    x = noise if init is None else noised(init, noise, times[0])
    velocity = guided(model, prompt, null_prompt, cfg_scale, hint, exit_tolerance, record_iters)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x - (t - t_next) * velocity(x, t, iters)
        if keep is not None:
            x = torch.lerp(x, noised(init, noise, t_next), keep)
    return x


def consistency_fn(velocity, x, t, iters):
    """f(x_t, t) = x_t - t v(x_t, t), the x_0 a consistency model predicts; f(x, 0) = x exactly.
    velocity: v(x, t, iters), as encode_once() returns."""
    return x - t.view(-1, 1, 1, 1) * velocity(x, t, iters)


def consistency_loss(student, target, teacher, x0, prompt, null_prompt, t_low, t_high, cfg_scale, teacher_iters, iters,
                     huber_c):
    """Consistency distillation (CM, Algorithm 2) for one batch; t_low < t_high are (B,)
    neighbours on the teacher's grid (CM's t_n < t_{n+1}). The teacher takes one guided Euler
    step from t_high down to t_low; the student at t_high must predict what the target
    predicts at t_low."""
    x_high = noised(x0, torch.randn_like(x0), t_high.view(-1, 1, 1, 1))
    with torch.no_grad():
        v = guided(teacher, prompt, null_prompt, cfg_scale)(x_high, t_high, teacher_iters)
        x_low = x_high - (t_high - t_low).view(-1, 1, 1, 1) * v
        goal = consistency_fn(encode_once(target, prompt), x_low, t_low, iters)
    # the student is called whole, as DDP and torch.compile wrap it
    student_velocity = lambda x, t, iters: student(x, t, prompt.text, prompt.mask, iters)  # noqa: E731
    prediction = consistency_fn(student_velocity, x_high, t_high, iters)
    distance = (prediction - goal).float().square().sum(dim=(1, 2, 3))
    return (torch.sqrt(distance + huber_c ** 2) - huber_c).mean()  # pseudo-Huber (iCT, arXiv 2310.14189)


@torch.no_grad()
def consistency_sample(model, noise, prompt, steps=2, iters=8, generator=None, init=None, strength=1.0, keep=None,
                       hint=None, exit_tolerance=0.0, record_iters=None):
    """Multistep consistency sampling (CM, Algorithm 1): predict x_0, re-noise it to the
    next time of the grid, predict again. The guidance is baked into the student.
    init, strength and keep edit an image as in euler_sample; keep acts on each x_0."""
    times = time_grid(steps, 1.0, strength).to(noise.device)
    if init is not None and strength == 0:
        return init.expand_as(noise)
    x = noise if init is None else noised(init, noise, times[0])
    velocity = encode_once(model, prompt, hint, exit_tolerance, record_iters)
    for t, t_next in zip(times[:-1], times[1:]):
        x0 = consistency_fn(velocity, x, t.expand(len(x)), iters)
        if keep is not None:
            x0 = torch.lerp(x0, init, keep)
        x = noised(x0, torch.randn(x.shape, generator=generator).to(x), t_next)  # = x0 at the last step, t_next = 0
    return x


@torch.no_grad()
def text_to_image(model, vae, encoder, prompts, noise, steps=25, cfg_scale=4.0, iters=8, shift=1.0, sampler='euler',
                  generator=None, init=None, strength=1.0, keep=None, control_map=None, control_strength=1.0,
                  exit_tolerance=0.0, record_iters=None):
    """Prompts -> uint8 images (B, 3, H, W): encode the text, sample the latent, decode.
    sampler: 'euler' for a train_flow.py model, 'consistency' for a distill.py one (whose
    re-noising draws from generator). init, strength, keep: editing, see euler_sample.
    control_map: control maps (B, 1, H, W) for a model with a ControlAdapter, whose hint is
    scaled by control_strength (0: the base model, 1: as trained). exit_tolerance, record_iters:
    as in encode_once."""
    prompt = Prompt(*encoder(prompts))
    hint = None if control_map is None else model.encode_control(control_map.to(noise.device), control_strength)
    edit = dict(init=init, strength=strength, keep=keep, hint=hint, exit_tolerance=exit_tolerance,
                record_iters=record_iters)
    if sampler == 'consistency':
        z = consistency_sample(model, noise, prompt, steps=steps, iters=iters, generator=generator, **edit)
    else:
        z = euler_sample(model, noise, prompt, Prompt(*encoder([""])), steps=steps, cfg_scale=cfg_scale, iters=iters,
                         shift=shift, **edit)
    return to_uint8(vae.decode_latent(z).float()).cpu()


@torch.no_grad()
def upscale(model, vae, encoder, small, prompts, noise, strength=0.3, **sampling):
    """Super-resolution with the text-to-image model: uint8 (B, 3, S/2, S/2) -> uint8
    (B, 3, S, S) whose Haar LL subband is the input's (its 2x2 block means are the input).
    The bicubic upsample is encoded and denoised from t = strength (img2img: low noise
    keeps the layout and lets the generator redraw the detail that bicubic blurs away);
    then the result's LL subband is replaced by the input's (wavelet.impose_lowpass), so
    the generator may add detail (LH, HL, HH) but never change what the input shows.
    noise: (B, 16, S/16, S/16); sampling: text_to_image's steps, cfg_scale, iters, ..."""
    bicubic = F.interpolate(to_float(small), scale_factor=2, mode='bicubic', align_corners=False).clamp(-1, 1)
    init = vae.encode_latent(bicubic.to(noise.device))
    images = text_to_image(model, vae, encoder, prompts, noise, init=init, strength=strength, **sampling)
    return keep_input(images, small)


def keep_input(images, small):
    """upscale's last step: uint8 images (B, 3, S, S) with their Haar LL subband replaced by
    the uint8 input's (B, 3, S/2, S/2), so their 2x2 block means are the input."""
    return to_uint8(impose_lowpass(to_float(images), to_float(small)))
