"""Training: `DPOTrainer` and its configuration, checkpoints (save, validate, resume), the metrics log and
training-health watch, and the model forward that training and evaluation share (`scoring`: the batch a
layout builds through the model to per-pair log-probs). Imports the loss core and the data layer."""
