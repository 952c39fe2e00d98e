# The quick recipe for a plain CPU: a small model trained on packed windows for about 8 minutes on 2 cores,
# chosen for the best validation NLL per minute (benchmarks/README.md, "Quick recipe search").
#   python custom_training.py config/quick_cpu.py [--field value ...]
# For a longer run raise max_steps: the cosine schedule stretches to it (README: "The quick recipe").
dim = 128
depth = 4
heads = 2
dim_head = 64
prev_tokens = 9  # 6 until a 20-minute run with 9 copied and passed the C2ST better (README)
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
generate_every = 500
save_every = 500
generate_length = 512
