"""The language models side of the science: residual-stream capture hooks, tokenizer alignment and vocabulary
tables. Imports nothing else of the project."""
