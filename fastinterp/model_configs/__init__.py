"""open_clip model configs that fastinterp registers (tiny ViTs for fast tests and the demo)."""
