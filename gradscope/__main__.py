"""``python -m gradscope`` runs the command-line interface."""
from gradscope.cli import main_entry

main_entry()
