# CPU quickstart: 64x64 procedural shapes (embedded, offline), tiny models; minutes on 2 cores.
#   python train_vae.py config/shapes.py && python train_flow.py config/shapes.py && python sample.py config/shapes.py
#   python distill.py config/shapes.py && python sample.py --out_dir=out-shapes-cd --steps 2
# A real folder of captioned images instead: add --data_dir=PATH (images + metadata.jsonl).
# One file for every stage: each script sees its own name as `script`.
if script in ('train_vae', 'train_flow'):
    dataset = 'shapes'
    image_size = 64  # -> 4x4x16 latents
    num_images = 10000  # as good as 20,000 for both, and half the drawing and encoding (docs/speedrun.md)

# Muon and a warmup-stable-decay schedule to zero, for both models (docs/speedrun.md: what each bought)
if script in ('train_vae', 'train_flow'):
    muon = True
    min_lr = 0.0
    cooldown = 0.5

if script == 'train_vae':
    out_dir = 'out-shapes-vae'
    # half the channels in every stage, for more of the cheaper steps at a higher rate: as good
    # a VAE in less time (docs/speedrun.md, record 2)
    channels = (16, 32, 64)
    batch_size = 32
    lr = 3e-3
    max_steps = 1000
    eval_interval = 200

if script in ('train_flow', 'sample', 'export_mobile'):
    out_dir = 'out-shapes-flow'
if script == 'train_flow':
    vae_dir = 'out-shapes-vae'
    # 96 wide rather than 128, for more of the cheaper steps: as good a generator in less time
    # (docs/speedrun.md, record 3)
    dim, heads, core_layers = 96, 2, 2
    patch_size = 1  # 64 px -> a 4x4 latent -> 16 tokens
    # GRFM pays off on long sequences; at 16 tokens full attention is the faster mixer
    # (docs/results.md, 'GRFM against full self-attention')
    mixer = 'attention'
    # Huginn's recipe on a Core of two layers: told nothing of its iteration, started from
    # noise, r drawn heavy-tailed around 2 (at most 8), gradients through the last 2
    # iterations only (docs/results.md, 'The recurrence')
    iteration_embedding = 'none'
    state_init = 'noise'
    train_iters = (8,)
    train_iters_mean = 2.0
    backprop_iters = 2
    batch_size = 64
    lr = 3e-3
    warmup_steps = 100
    max_steps = 1600
    ema_decay = 0.995  # a half-life of 140 steps, about a tenth of the run (0.999's is 700)
    eval_interval = 500
    sample_iters = 2  # its best r; more draw as well, fewer worse

if script == 'distill':
    out_dir = 'out-shapes-cd'
    teacher_dir = 'out-shapes-flow'
    batch_size = 64
    max_steps = 1500
    eval_interval = 500
