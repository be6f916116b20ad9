# The seed's setup: Pokemon BLIP captions (833 images) at 256x256 on one free T4 GPU.
#   python train_vae.py config/pokemon.py && python train_flow.py config/pokemon.py && python sample.py config/pokemon.py
# Offline, put the images in a folder with a metadata.jsonl and add --data_dir=PATH.
if script in ('train_vae', 'train_flow'):
    dataset = 'reach-vb/pokemon-blip-captions'
    image_size = 256  # -> 16x16x16 latents
    num_holdout = 33

if script == 'train_vae':
    out_dir = 'out-pokemon-vae'
    channels = (64, 128, 256)
    blocks_per_stage = 2
    batch_size = 16
    max_steps = 20000
    lr = 4e-4
    min_lr = 4e-5
    warmup_steps = 500
    eval_interval = 1000

if script in ('train_flow', 'sample', 'export_mobile'):
    out_dir = 'out-pokemon-flow'
if script == 'train_flow':
    vae_dir = 'out-pokemon-vae'
    model_size = 'small'  # 47M; patch 2 -> 64 tokens at 256 px
    batch_size = 32
    max_steps = 30000
    lr = 1e-4
    min_lr = 1e-5
    warmup_steps = 1000
    eval_interval = 1000
    backprop_iters = 4  # memory stays flat in r on a 16 GB T4
