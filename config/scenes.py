# Composition on the CPU: 1-4 shapes on grey, captioned with GenEval's six templates, scored
# exactly on held-out combinations (eval_scenes.py). The task where more Core iterations should pay.
#   python train_vae.py config/scenes.py && python train_flow.py config/scenes.py
#   python eval_scenes.py config/scenes.py --exit_tolerance=0.1
#   python sample.py config/scenes.py --prompt "a red circle left of a blue square"
if script in ('train_vae', 'train_flow'):
    dataset = 'scenes'
    image_size = 96  # -> 6x6x16 latents, at which the analyser reads the VAE's reconstructions
    num_images = 20000

if script in ('train_vae', 'train_flow'):
    # the quickstart's recipe (docs/speedrun.md): Muon, and a learning rate held, then
    # decayed to zero over the last half
    muon = True
    min_lr = 0.0
    cooldown = 0.5

if script == 'train_vae':
    out_dir = 'out-scenes-vae'
    channels = (32, 64, 128)
    batch_size = 32
    lr = 2e-3
    max_steps = 800  # sharper than AdamW's 2000 (docs/results.md, 'Composition')
    eval_interval = 400

if script in ('train_flow', 'sample', 'eval_scenes', 'export_mobile'):
    out_dir = 'out-scenes-flow'
if script == 'train_flow':
    vae_dir = 'out-scenes-vae'
    dim, heads, core_layers = 128, 2, 2
    patch_size = 1  # 96 px -> a 6x6 latent -> 36 tokens
    mixer = 'attention'
    # Huginn's recipe: no iteration signal, r heavy-tailed around its mean, gradients through
    # the last iterations only, the state started from noise (docs/results.md, 'Composition')
    iteration_embedding = 'none'
    state_init = 'noise'
    train_iters = (16,)
    train_iters_mean = 4.0
    backprop_iters = 4
    batch_size = 64
    lr = 3e-3
    warmup_steps = 100
    max_steps = 3000  # a little longer than AdamW's 3200; longer still composes far better (docs/results.md)
    ema_decay = 0.995
    eval_interval = 1000
    sample_iters = 8

if script == 'distill':
    out_dir = 'out-scenes-cd'
    teacher_dir = 'out-scenes-flow'
    batch_size = 64
    max_steps = 1500
    eval_interval = 500
