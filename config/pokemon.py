# The seed's setup as a quickstart: Pokemon BLIP captions (833 images) at 256x256 on one GPU
# (fp16 + GradScaler on a T4, bf16 on newer GPUs, chosen by dtype='auto'); its time and memory
# are in docs/results.md, and `python check_gpu.py --data_dir=PATH` checks a GPU runs it all:
#   python train_vae.py config/pokemon.py && python train_flow.py config/pokemon.py
#   python sample.py config/pokemon.py
#   python distill.py config/pokemon.py && python sample.py config/pokemon.py --out_dir=out-pokemon-cd --steps=2
#   python export_mobile.py config/pokemon.py --precision=fp16
# A better model within one free Colab runtime: add config/pokemon_long.py after this file.
# The seed's Stage 3, 256 -> 512 px: the same VAE (fully convolutional) and the 256 px generator
# continued at 512 px with the timestep shift its token count asks for (2.0, train_flow.py's shift):
#   python train_flow.py config/pokemon.py --image_size=512 --init_from=out-pokemon-flow \
#       --out_dir=out-pokemon-flow-512 --batch_size=8 --max_steps=1000 --warmup_steps=100
#   python sample.py config/pokemon.py --out_dir=out-pokemon-flow-512
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
    max_steps = 5000
    lr = 4e-4
    min_lr = 4e-5
    warmup_steps = 200
    eval_interval = 1000

if script in ('train_flow', 'sample', 'export_mobile'):
    out_dir = 'out-pokemon-flow'
if script == 'train_flow':
    vae_dir = 'out-pokemon-vae'
    model_size = 'small'  # patch 2 -> 64 tokens at 256 px
    patch_size = 2
    train_iters = (4, 6, 8)  # small: each core iteration adds kernel launches, which bound a GPU step here
    backprop_iters = 4  # memory stays flat in r
    batch_size = 32
    max_steps = 3000
    lr = 3e-4
    min_lr = 3e-5
    warmup_steps = 200
    eval_interval = 500
    # SD3's uniform weighting keeps more detail on real images than the seed's t / (1 - t + 0.05),
    # and a briefly trained model gains nothing past the smallest r it trained on, so the grids
    # use 4 (docs/results.md, 'Real pictures')
    loss_weighting = 'none'
    sample_iters = 4

if script == 'distill':
    out_dir = 'out-pokemon-cd'
    teacher_dir = 'out-pokemon-flow'
    batch_size = 32
    max_steps = 1000
    eval_interval = 250
