"""The ~10.7M-parameter character-level model on tiny shakespeare (nanoGPT's baby GPT).
Batch: 64 x 256 on CUDA, 8 x 128 on CPU (the preset's defaults)."""
dataset = "shakespeare_char"
preset = "shakespeare_char"
out_dir = "out/shakespeare_char"
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 10
