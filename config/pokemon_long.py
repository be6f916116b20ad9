# A longer Pokemon run for one free Colab runtime (its estimated time on a T4:
# `python bench.py --sections=memory --config=config/pokemon.py,config/pokemon_long.py`).
# It overrides the quickstart, so name both, in this order:
#   python train_vae.py config/pokemon.py config/pokemon_long.py
#   python train_flow.py config/pokemon.py config/pokemon_long.py
#   python sample.py config/pokemon.py config/pokemon_long.py
if script == 'train_vae':
    out_dir = 'out-pokemon-long-vae'
    max_steps = 15000
    warmup_steps = 500

if script in ('train_flow', 'sample', 'export_mobile'):
    out_dir = 'out-pokemon-long-flow'
if script == 'train_flow':
    vae_dir = 'out-pokemon-long-vae'
    train_iters = (4, 6, 8, 10, 12)
    max_steps = 22000
    lr = 1e-4
    min_lr = 1e-5
    warmup_steps = 1000
    eval_interval = 1000

if script == 'distill':
    out_dir = 'out-pokemon-long-cd'
    teacher_dir = 'out-pokemon-long-flow'
    max_steps = 4000
    eval_interval = 500
