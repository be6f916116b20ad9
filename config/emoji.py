# Real pictures on 2 CPU cores, in stages: emoji in three drawing styles (Twemoji, Noto, Fluent;
# test emoji unseen in every style), captioned with their Unicode names, with a fourth style
# (Emoji One) left out of training to measure how the model carries over to a style it never saw.
# The VAE trains on 64 px crops and is used at 128 px; the generator trains at 64 px (4x4 latents)
# and continues at 128 px (8x8) from that run, with SD3's timestep shift for 4x the tokens.
#   pip install -r data/emoji/requirements.txt && npm ci --prefix data/emoji
#   python data/emoji/prepare.py --styles=twemoji,noto,fluent --out=data/emoji/128-3styles   # training
#   python data/emoji/prepare.py                                     # all four styles, for the test split
#   python train_vae.py config/emoji.py                              # stage 1: the VAE on crops
#   python train_flow.py config/emoji.py config/emoji_64.py          # stage 2: the generator at 64 px
#   python train_flow.py config/emoji.py                             # stage 3: at 128 px, from stage 2
#   python sample.py config/emoji.py && python eval_real.py config/emoji.py
# dtype='auto' trains in bf16 where the CPU has it natively (AMX, AVX512-BF16), else in fp32.
if script in ('train_vae', 'train_flow'):
    data_dir = 'data/emoji/128-3styles/train'
    image_size = 128
    num_holdout = 64
    # the quickstart's recipe (docs/speedrun.md): Muon, and a learning rate held, then decayed
    # to zero over the last half; a sharper VAE and generator in about AdamW's time (docs/results.md)
    muon = True
    min_lr = 0.0
    cooldown = 0.5
if script == 'train_vae':
    out_dir = 'out-emoji-vae'
    crop_size = 64  # a quarter of the pixels per image, so many more images per minute (docs/results.md)
    channels = (48, 96, 192)
    batch_size = 16
    max_steps = 3000
    lr = 2e-3
    warmup_steps = 100
    eval_interval = 1000

if script in ('train_flow', 'sample', 'eval_real', 'export_mobile'):
    out_dir = 'out-emoji-flow'
if script == 'train_flow':
    vae_dir = 'out-emoji-vae'
    init_from = 'out-emoji-flow-64'  # stage 2's run (config/emoji_64.py)
    dim, heads, core_layers = 256, 4, 2
    patch_size = 1  # 128 px -> an 8x8 latent -> 64 tokens
    mixer = 'attention'  # at 16 and 64 tokens full attention is the faster mixer
    # the recurrence recipe of config/shapes.py (Huginn's): no iteration signal, a noise start,
    # r heavy-tailed around 2 (at most 8), gradients through the last 2 iterations
    iteration_embedding = 'none'
    state_init = 'noise'
    train_iters = (8,)
    train_iters_mean = 2.0
    backprop_iters = 2
    batch_size = 32
    lr = 2e-3
    loss_weighting = 'none'  # SD3's, which keeps more detail on real pictures (docs/results.md)
    warmup_steps = 100
    max_steps = 3000
    eval_interval = 1000
    sample_iters = 4
if script == 'eval_real':
    test_dir = 'data/emoji/128/test'  # all four styles: Emoji One is the one training never saw

if script == 'distill':
    out_dir = 'out-emoji-cd'
    teacher_dir = 'out-emoji-flow'
    batch_size = 32
    max_steps = 600
    eval_interval = 200
