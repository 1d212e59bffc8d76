"""The `dgemma` command (main.py): one parser, one error handler; each command's runner loads when it runs."""
