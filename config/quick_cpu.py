# The quick recipe for a plain CPU: a small model trained on packed windows, chosen for the best validation NLL
# per minute of a CPU (docs/decisions.md, "The quick recipe"; its time: README, "Recipes").
#   python custom_training.py config/quick_cpu.py [--field value ...]
# For a longer run raise max_steps: the cosine schedule stretches to it.
dim = 128
depth = 4
heads = 2
dim_head = 64
prev_tokens = 9  # the embeddings of the 9 tokens (3 notes) before each position: the model learns to copy
seq_len = 256
batch_size = 16
grad_accum = 1
pack = True
tune_mask = True
dropout = 0.0
lr = 2e-3
lr_schedule = 'cosine'
warmup_steps = 50
min_lr = 1e-4
max_steps = 1650
validate_every = 250
val_tokens = None  # the whole held-out split: a step here trains on thousands of tokens, so validation stays small
generate_every = 500
save_every = 500
generate_length = 512
