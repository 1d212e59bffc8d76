"""`dgemma eval`: quality of diffusion against AR decoding of the same weights (eval.py)."""
