# A control adapter on the emoji generator (config/emoji.py): draw a caption inside the edges of another picture.
#   python train_control.py config/emoji_edges.py   (after config/emoji.py's VAE and generator)
#   python sample.py config/emoji_edges.py --control_image picture.png --prompt "grinning face"
#   python eval_real.py config/emoji_edges.py       (edge agreement on the test emoji)
if script == 'train_flow':  # the adapter trains with its own script
    raise SystemExit("error: config/emoji_edges.py trains a control adapter; run "
                     "python train_control.py config/emoji_edges.py")
if script in ('train_control', 'sample', 'eval_real', 'export_mobile'):
    out_dir = 'out-emoji-edges'
if script == 'train_control':
    base_dir = 'out-emoji-flow'
    control = 'edges'
    cfg_dropout = 0.5  # ControlNet's: with half the captions empty, the layout must be read from the control
    batch_size = 32
    lr = 1e-3
    min_lr = 1e-4
    warmup_steps = 50
    max_steps = 1000
    eval_interval = 250
if script == 'eval_real':
    sections = 'control'
