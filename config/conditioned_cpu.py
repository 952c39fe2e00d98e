# The shipped conditioned model's recipe (models/conditioned_cpu.pt): the shipped model (models/long_cpu.pt) taught
# to read a key, meter and style header, on the Essen and the Irish/Scottish tunes together (content/folk_dataset
# links both zips; 30 styles: the 27 Essen collections and airds, oneills1850, ryans). Its shape and tokenization
# are long_cpu.py's, as fine-tuning needs; a new schedule with a lower peak, so the melody it knows is kept.
#   python custom_training.py config/conditioned_cpu.py [--field value ...]
init_from = 'shipped'
data_path = './content/folk_dataset'
condition = True
condition_dropout = 0.3
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
lr = 1e-3
lr_schedule = 'cosine'
warmup_steps = 100
min_lr = 1e-4
max_steps = 3000
validate_every = 250
val_tokens = None  # the whole held-out split: a step here trains on thousands of tokens, so validation stays small
generate_every = 1000
save_every = 500
generate_length = 512
save_dir = './content/checkpoints/conditioned_cpu'
samples_dir = './content/samples/conditioned_cpu'
