"""Region edits (docs/masks.md): masks given or found, framed, blended, pasted."""
