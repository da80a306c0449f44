"""Stage 3: embed, index, search and serve with an exported or trained model."""
