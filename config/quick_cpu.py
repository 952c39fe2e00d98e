# The quick recipe for a plain CPU: a small model trained on packed windows, chosen for the best validation NLL
# per minute on a 2-core CPU (benchmarks/README.md, "Quick recipe search").
#   python custom_training.py config/quick_cpu.py [--field value ...]
dim = 256
depth = 4
heads = 4
dim_head = 64
seq_len = 256
batch_size = 16
grad_accum = 1
pack = True
dropout = 0.0
lr = 2e-3
lr_schedule = 'cosine'
warmup_steps = 100
min_lr = 1e-4
max_steps = 2000
validate_every = 250
generate_every = 500
save_every = 500
generate_length = 512
