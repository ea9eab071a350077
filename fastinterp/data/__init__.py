"""Small built-in data files (the demo concept list)."""
