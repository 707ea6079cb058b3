"""What a run shows a person: the contact sheet (sheet.py draws, write.py reads and writes it)."""
