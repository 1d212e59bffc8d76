"""Training: pretraining (pretrain.py), fine-tuning and LoRA (finetune.py flags, finetune_loop.py), the objective
(objective.py), corpora (corpora.py), shards and batches (data.py) and chat data for SFT (sft.py)."""
