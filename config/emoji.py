# Real pictures on 2 CPU cores: Twemoji (its training emoji, and test emoji it never sees) at
# 128 px -> 8x8x16 latents, captioned with their Unicode names. dtype='auto' trains in bf16 where
# the CPU has it natively (AMX, AVX512-BF16) and in fp32 elsewhere, where emulated bf16 is slower.
#   pip install -r data/emoji/requirements.txt && python data/emoji/prepare.py --styles=twemoji
#   python train_vae.py config/emoji.py && python train_flow.py config/emoji.py && python sample.py config/emoji.py
#   python distill.py config/emoji.py && python eval_real.py config/emoji.py
if script in ('train_vae', 'train_flow'):
    data_dir = 'data/emoji/128-twemoji/train'
    image_size = 128
    num_holdout = 64
if script == 'train_vae':
    out_dir = 'out-emoji-vae'
    channels = (48, 96, 192)
    batch_size = 16
    max_steps = 3000
    lr = 1e-3
    min_lr = 1e-4
    warmup_steps = 100
    eval_interval = 1000

if script in ('train_flow', 'sample', 'eval_real', 'export_mobile'):
    out_dir = 'out-emoji-flow'
if script == 'train_flow':
    vae_dir = 'out-emoji-vae'
    dim, heads, core_layers = 256, 4, 2
    patch_size = 1  # 128 px -> an 8x8 latent -> 64 tokens
    train_iters = (2, 4, 6)
    batch_size = 32
    lr = 1e-3
    min_lr = 1e-4
    loss_weighting = 'none'  # SD3's, which keeps more detail on real pictures (docs/results.md)
    warmup_steps = 100
    max_steps = 3000
    eval_interval = 500
    sample_iters = 4

if script == 'distill':
    out_dir = 'out-emoji-cd'
    teacher_dir = 'out-emoji-flow'
    iters = 4
    batch_size = 32
    max_steps = 600
    eval_interval = 200
