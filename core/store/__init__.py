"""The teacher store: its format's only reader and writer, the encodings, feature sketches, verification."""
