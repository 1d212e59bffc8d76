"""Tasks with their own data and scoring: Sudoku (sudoku.py: puzzles, tokenizer, data; sudoku_eval.py: solve rate)."""
