# The quick recipe for one GPU: config/quick_cpu.py's recipe (9 previous-token embeddings, packed windows with the
# tune mask, cosine schedule) made 8 layers of 256 wide (8.67M parameters) with twice the batch and dropout 0.1,
# because on a GPU width and depth cost little time and the bundled 1.26M training tokens overfit a wide model
# without dropout (it still does after about 5,000 steps). Measured on one H200: docs/decisions.md, "The GPU recipe".
#   python custom_training.py config/quick_gpu.py [--field value ...]
dim = 256
depth = 8
heads = 4
dim_head = 64
prev_tokens = 9
seq_len = 256
batch_size = 32
grad_accum = 1
pack = True
tune_mask = True
dropout = 0.1
lr = 1e-3
lr_schedule = 'cosine'
warmup_steps = 200
min_lr = 1e-4
max_steps = 6000
validate_every = 250
val_tokens = None  # the whole held-out split: a step here trains on thousands of tokens, so validation stays small
generate_every = 1000
save_every = 500
generate_length = 512
