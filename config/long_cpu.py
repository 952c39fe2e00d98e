# The shipped model's recipe (models/long_cpu.pt), a long CPU run: config/quick_cpu.py made 192 wide (3 heads of
# 64) with dropout 0.1, lr 1.5e-3 and 100 warmup steps. Over minutes the 128-wide quick recipe wins; over many
# thousand steps it stops improving while this one keeps going (docs/decisions.md, "The shipped model's recipe").
#   python custom_training.py config/long_cpu.py [--field value ...]
dim = 192
depth = 4
heads = 3
dim_head = 64
prev_tokens = 9
seq_len = 256
batch_size = 16
grad_accum = 1
pack = True
tune_mask = True
dropout = 0.1
lr = 1.5e-3
lr_schedule = 'cosine'
warmup_steps = 100
min_lr = 1e-4
max_steps = 14000
validate_every = 250
val_tokens = None  # the whole held-out split: a step here trains on thousands of tokens, so validation stays small
generate_every = 1000
save_every = 500
generate_length = 512
