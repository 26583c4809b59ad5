"""``python -m gradscope`` runs the command-line interface."""
from gradscope.cli import main_entry

if __name__ == "__main__":  # guarded: the study's worker processes (spawn) import this module again
    main_entry()
